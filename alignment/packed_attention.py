"""Variable-length attention for packed rows with sdpa or eager attention, on any device.

A packed row (``position_ids`` restarting at 0 for every sequence, no attention mask) through transformers' sdpa
or eager attention attends over one ``N × N`` block-causal mask: ``N²`` scores where the sequences need only
``Σ nᵢ²`` (flash-attention's variable-length kernel does that, on a GPU with the ``flash-attn`` package). On the
bundled data's lengths that makes a packed step slower than the padded one on a CPU.

``use_varlen_attention(model)`` switches a model that runs sdpa or eager attention to ``prefuse_varlen_sdpa`` /
``prefuse_varlen_eager``: registered with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``,
they cut a packed row at every position-id restart and run the model's own attention (sdpa, or the model's eager
function with its softcap) on each sequence alone, causal, within the layer's sliding window. Nothing else
changes: a batch with an attention mask (padded rows) gets the base implementation's mask and attention, a row
without restarts is one sequence. The scores of a sequence are those of the block-causal mask's diagonal block,
so the outputs equal the block-causal computation's to rounding.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from prefuse.alignment.model_head import unwrap_causal_lm
from torch import Tensor

BASES = ("sdpa", "eager")
"""The implementations ``use_varlen_attention`` wraps; flash and flex attention handle packed rows themselves."""


def sequence_bounds(position_ids: Tensor | None, length: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the sequences of one packed row: a sequence starts at index 0 and wherever
    ``position_ids[0]`` is 0. Without ``position_ids`` the row is one sequence.

    Finding the starts reads the device once (a host sync); every layer of a forward gets the same
    ``position_ids`` tensor, so the bounds of the last one asked for are kept (``_last_bounds``) and the other
    layers, and a recomputation under gradient checkpointing, reuse them."""
    if position_ids is None:
        return [(0, length)]
    key = (position_ids._version, length)
    if _last_bounds.get("key") == key and _last_bounds["tensor"]() is position_ids:
        return _last_bounds["bounds"]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    starts = sorted({0, *starts})
    bounds = list(zip(starts, starts[1:] + [length], strict=True))
    _last_bounds.update(key=key, tensor=weakref.ref(position_ids), bounds=bounds)
    return bounds


_last_bounds: dict = {}
"""``sequence_bounds``' last answer: its ``position_ids`` (a weak reference: a freed tensor is not taken for a new
one), their version counter (a tensor changed in place is read again), the row length and the bounds."""


def _base_attention(module, base: str) -> Callable:
    """The attention function the wrapped implementation runs per sequence: transformers' sdpa, or the eager
    function of the module's own modeling file (Gemma-2's applies the attention softcap)."""
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__}'s modeling file has no eager_attention_forward: use_varlen_attention cannot "
            "run its eager attention per sequence"
        )
    return eager


def _sequence_mask(base: str, n: int, window: int | None, query: Tensor) -> Tensor | None:
    """The causal mask of one sequence of ``n`` tokens (``q - k < window`` with a sliding window): None for sdpa
    when causal alone suffices (its ``is_causal`` path), a bool mask for sdpa, an additive one for eager."""
    if base == "sdpa" and (window is None or n <= window):
        return None
    q = torch.arange(n, device=query.device)
    allowed = q.unsqueeze(1) >= q.unsqueeze(0)
    if window is not None:
        allowed &= (q.unsqueeze(1) - q.unsqueeze(0)) < window
    allowed = allowed[None, None]
    if base == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, torch.finfo(query.dtype).min
    )


def _varlen_attention(base: str) -> Callable:
    def forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
        attend = _base_attention(module, base)
        if attention_mask is not None:  # padded rows: the base implementation's own mask
            return attend(module, query, key, value, attention_mask, **kwargs)
        length, window = query.shape[2], kwargs.get("sliding_window")
        packed = query.shape[0] == 1 and key.shape[2] == length
        bounds = sequence_bounds(kwargs.get("position_ids") if packed else None, length)
        if len(bounds) == 1:
            return attend(module, query, key, value, _sequence_mask(base, length, window, query), **kwargs)
        outputs = [
            attend(
                module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                _sequence_mask(base, e - s, window, query), **kwargs,
            )[0]
            for s, e in bounds
        ]  # fmt: skip
        return torch.cat(outputs, dim=1), None  # (1, N, heads, head_dim), as the base returns it

    forward.__doc__ = f"{base} attention run on each sequence of a packed row alone (module docstring)."
    return forward


def _varlen_mask(base: str) -> Callable:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base_mask = ALL_MASK_ATTENTION_FUNCTIONS[base]

    def mask(*args, attention_mask=None, **kwargs):
        """The base implementation's mask for padded rows; none without an attention mask (the attention builds
        each sequence's own, so no ``N × N`` mask is materialised)."""
        if attention_mask is None:
            return None
        return base_mask(*args, attention_mask=attention_mask, **kwargs)

    return mask


def use_varlen_attention(model) -> str:
    """Run ``model``'s sdpa / eager attention per sequence on packed rows (module docstring); returns the
    implementation the model uses afterwards. ``model``: a Hugging Face causal LM, also inside a PEFT / DDP
    wrapper. Models on another implementation (flash, flex: variable-length already) are left as they are. The
    switch is not saved with the model (``config.json`` has no attention implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model = unwrap_causal_lm(model)
    base = model.config._attn_implementation
    if base not in BASES:
        return base
    name = f"prefuse_varlen_{base}"
    AttentionInterface.register(name, _varlen_attention(base))
    AttentionMaskInterface.register(name, _varlen_mask(base))
    model.set_attn_implementation(name)
    return name
