"""Hidden states of a Hugging Face causal LM without its lm-head matmul, and the head prefuse needs instead.

``forward_hidden(model, input_ids, attention_mask)`` runs ``model`` (a ``*ForCausalLM``, possibly wrapped by
PEFT, DDP, DeepSpeed, ``torch.compile`` ...) through its own outermost ``forward`` -- so wrapper hooks (DDP's
gradient-sync preparation, accelerate's autocast, PEFT's adapters, gradient checkpointing) all run -- but
swaps the output-embedding module's ``forward`` for the duration of the call: instead of ``hidden @ W^T`` it
records its input (the last hidden state, after the final norm and whatever the model does before its head)
and returns zero-width "logits" ``hidden @ W[:0]^T`` of shape ``(..., 0)``. No ``(tokens x vocab)`` tensor is
ever built, and the zero-width output keeps the head's parameters in the autograd graph of the model's output
(what DDP's unused-parameter search walks).

What the model does *after* its head is returned as options for ``prefuse.kernels.linear_logprobs``
(``head_options``), so that ``linear_logprobs(hidden, weight, labels, bias, shift=True, **options)`` equals
``log_softmax(model(...).logits)`` gathered at the labels:

- ``softcap``: Gemma-2/3 ``final_logit_softcapping`` (RecurrentGemma ``logits_soft_cap``):
  ``logits = c * tanh(logits / c)``.
- ``temperature``: a constant factor ``s`` on the logits is a temperature ``1 / s``, since
  ``log_softmax(s * z) = log_softmax(z / (1/s))``. Cohere's ``logit_scale`` and Falcon-H1's
  ``lm_head_multiplier`` multiply (``temperature = 1 / s``); Granite's ``logits_scaling`` divides
  (``temperature = logits_scaling``). prefuse applies the softcap *before* the temperature; no known model has
  both, and a config with both raises rather than guess the order.

The lm-head weight is the tied input embedding where the model ties them (same ``Parameter``: its gradient
collects both uses). A LoRA adapter *on the lm-head* is refused (its delta would be skipped); PEFT's
``modules_to_save`` copy of the head is followed (the active copy, or the original with adapters disabled).
DeepSpeed ZeRO-3 (a partitioned head read outside its module's forward) is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalLMHead",
    "adapter_disabled",
    "check_head",
    "forward_hidden",
    "head_options",
    "is_peft_model",
    "output_head",
    "unwrap_causal_lm",
]


class CausalLMHead(NamedTuple):
    """What ``forward_hidden`` hands back.

    ``hidden`` ``(B, T, D)`` is the lm-head's input (same dtype and device as ``weight``); ``weight`` ``(V, D)``
    and ``bias`` ``(V,)`` or None the head; ``softcap`` / ``temperature`` the post-head transform as
    ``linear_logprobs`` options (``head_options``).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    temperature: float

    @property
    def options(self) -> dict[str, Any]:
        """``{"softcap": ..., "temperature": ...}`` for ``linear_logprobs`` or a prefuse loss module."""
        return {"softcap": self.softcap, "temperature": self.temperature}

    def logprobs(self, labels: Tensor, *, shift: bool = True, ignore_index: int = -100,
                 backend: str = "auto") -> Tensor:
        """Per-token ``log p(label)`` through ``prefuse.kernels.linear_logprobs`` (``(B, T-1)`` with shift)."""
        from prefuse.kernels import linear_logprobs

        return linear_logprobs(self.hidden, self.weight, labels, self.bias, ignore_index=ignore_index,
                               shift=shift, backend=backend, **self.options)


# ---------------------------------------------------------------------------------------------- unwrapping
def is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT ``PeftModel`` (possibly inside DDP / DeepSpeed / ``torch.compile`` wrappers)."""
    for module in _wrapper_chain(model):
        if _is_peft(module):
            return True
    return False


def _is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def _wrapper_chain(model: nn.Module):
    """``model``, then what each wrapper wraps (DDP/FSDP/DeepSpeed ``.module``, compile ``._orig_mod``, PEFT)."""
    seen: set[int] = set()
    module = model
    while module is not None and id(module) not in seen:
        seen.add(id(module))
        yield module
        if _is_peft(module):
            module = module.get_base_model()
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        elif isinstance(getattr(module, "module", None), nn.Module):
            module = module.module
        else:
            module = None


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face ``PreTrainedModel`` with an output-embedding head inside ``model``'s wrappers."""
    from transformers import PreTrainedModel

    for module in _wrapper_chain(model):
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise ValueError(
        f"{type(model).__name__} holds no Hugging Face causal LM with an output-embedding head "
        "(get_output_embeddings() is None): prefuse needs the lm-head to compute log-probs"
    )


def _active_linear(head: nn.Module) -> nn.Module:
    """The module whose ``weight``/``bias`` the head applies (PEFT ``modules_to_save``: the active copy)."""
    is_lora = hasattr(head, "lora_A") or hasattr(head, "lora_embedding_A")
    if is_lora or (type(head).__module__.startswith("peft.tuners.") and hasattr(head, "base_layer")):
        raise ValueError(
            "a PEFT adapter on the lm-head is not supported: prefuse reads the head's weight directly, so the "
            "adapter's delta would be skipped (and never trained); remove the lm-head from target_modules "
            "(modules_to_save=['lm_head'] is supported)"
        )
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):  # PEFT ModulesToSaveWrapper
        active = getattr(head, "active_adapters", None) or [getattr(head, "active_adapter", None)]
        if isinstance(active, str):
            active = [active]
        name = active[0] if active else None
        if getattr(head, "disable_adapters", False) or name not in head.modules_to_save:
            return head.original_module
        return head.modules_to_save[name]
    return head


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight (V, D), bias (V,) or None)`` of ``model``'s lm-head (the tied embedding where tied)."""
    linear = _active_linear(unwrap_causal_lm(model).get_output_embeddings())
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"the lm-head {type(linear).__name__} has no (V, D) weight; prefuse needs a linear head")
    _refuse_zero3(weight)
    bias = getattr(linear, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


def _refuse_zero3(weight: Tensor) -> None:
    if hasattr(weight, "ds_id") and getattr(weight, "ds_numel", weight.numel()) != weight.numel():
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions the lm-head, and prefuse reads it outside the head's forward (its backward "
            "recomputes logit tiles from the weight): use ZeRO-1/2 or FSDP's full lm-head, or keep the head out "
            "of ZeRO-3 partitioning"
        )


# ---------------------------------------------------------------------------------------------- head options
_MULTIPLY = ("logit_scale", "lm_head_multiplier", "output_multiplier")  # logits * s
_DIVIDE = ("logits_scaling",)  # logits / s  (Granite family)
_SOFTCAP = ("final_logit_softcapping", "logits_soft_cap")


def head_options(model_or_config) -> dict[str, Any]:
    """``{"softcap": float | None, "temperature": float}`` reproducing the model's post-head transform.

    Accepts a model (wrapped or not) or its config; reads the text config of multimodal models.
    """
    config = getattr(model_or_config, "config", None)
    if config is None:
        try:
            config = unwrap_causal_lm(model_or_config).config
        except (ValueError, TypeError):
            config = model_or_config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = None
    for name in _SOFTCAP:
        value = getattr(config, name, None)
        if value is not None:
            softcap = _positive(name, value)
            break
    scale = 1.0
    for name in _MULTIPLY:
        value = getattr(config, name, None)
        if value is not None:
            scale *= _positive(name, value)
    for name in _DIVIDE:
        value = getattr(config, name, None)
        if value is not None:
            value = _positive(name, value)
            # HyperCLOVA X multiplies by its logits_scaling; the Granite family divides
            scale = scale * value if getattr(config, "model_type", "") == "hyperclovax" else scale / value
    if softcap is not None and scale != 1.0:
        raise ValueError(
            f"the model's config has both a logit softcap ({softcap}) and a logit scale ({scale}); prefuse applies "
            "softcap before temperature and cannot tell this model's order"
        )
    return {"softcap": softcap, "temperature": 1.0 / scale}


def _positive(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"config.{name} must be a finite positive number for prefuse's head, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- forward
@contextlib.contextmanager
def _capturing_head(causal_lm: nn.Module, box: dict):
    """Within the block, ``causal_lm``'s output-embedding module records its input and returns ``(..., 0)``."""
    head = causal_lm.get_output_embeddings()
    linear = _active_linear(head)
    had_own_forward = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def capture(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        box["hidden"] = hidden_states
        device_type = hidden_states.device.type
        if torch.is_autocast_enabled(device_type):
            box["autocast_dtype"] = torch.get_autocast_dtype(device_type)
        weight, bias = linear.weight, getattr(linear, "bias", None)
        # zero vocabulary rows: no work, but the head stays in the graph of the model's output
        return F.linear(hidden_states, weight[:0].to(hidden_states.device),
                        None if bias is None else bias[:0].to(hidden_states.device))

    head.forward = capture
    try:
        yield
    finally:
        if had_own_forward:
            head.forward = previous
        else:
            del head.forward


def forward_hidden(model: nn.Module, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                   **kwargs) -> CausalLMHead:
    """Run ``model`` to its lm-head's input without the head matmul; return it with the head and options.

    Args:
        model: a ``*ForCausalLM``, or a wrapper of one (PEFT, DDP, DeepSpeed engine, ``torch.compile``);
            it is *called* (``model(input_ids=..., attention_mask=..., use_cache=False, **kwargs)``), so
            the wrappers' forward logic and hooks run.
        input_ids, attention_mask, **kwargs: the model's inputs (``position_ids``, ``inputs_embeds`` ...).

    Returns:
        ``CausalLMHead(hidden, weight, bias, softcap, temperature)``. ``hidden`` is moved to the head's device
        and dtype (under autocast both are cast to the autocast dtype, differentiably, as ``nn.Linear`` would).
    """
    causal_lm = unwrap_causal_lm(model)
    weight, bias = output_head(causal_lm)
    box: dict = {}
    kwargs.setdefault("use_cache", False)
    with _capturing_head(causal_lm, box):
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if "hidden" not in box:
        raise ValueError(
            f"{type(causal_lm).__name__}.forward never called its output-embedding module; prefuse cannot take "
            "its last hidden state"
        )
    hidden = box["hidden"]
    if input_ids is not None and hidden.dim() == 3 and hidden.shape[1] > input_ids.shape[-1]:
        hidden = hidden[:, -input_ids.shape[-1]:]  # prompt-learning PEFT prepends virtual tokens
    if hidden.device != weight.device:  # a model split across devices ends on the head's device
        hidden = hidden.to(weight.device)
    dtype = box.get("autocast_dtype")
    if dtype is not None and dtype != weight.dtype:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    options = head_options(causal_lm)
    return CausalLMHead(hidden, weight, bias, options["softcap"], options["temperature"])


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """PEFT adapters off within the block (the base model = the reference); ``ValueError`` if not PEFT."""
    for module in _wrapper_chain(model):
        if _is_peft(module):
            with module.disable_adapter():
                yield
            return
    raise ValueError(f"{type(model).__name__} is not a PEFT model: it has no adapter to disable")


def check_head(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               atol: float = 1e-4) -> float:
    """Max abs difference between the model's own log-softmax and prefuse's head on ``input_ids``.

    A one-off check for an architecture this module does not know (it computes the full logits once);
    raises ``ValueError`` above ``atol``. Returns the difference.
    """
    from prefuse.kernels import linear_logprobs

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        naive = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        head = forward_hidden(model, input_ids, attention_mask)
        fused = linear_logprobs(head.hidden, head.weight, input_ids, head.bias, shift=True, **head.options)
    diff = (naive - fused).abs().max().item()
    if not diff <= atol:
        raise ValueError(f"prefuse's head differs from the model's logits by {diff:.3g} (> atol={atol})")
    return diff
