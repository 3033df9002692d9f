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

**Sharded heads (FSDP2, DeepSpeed ZeRO-3).** Outside its module's forward a sharded lm-head weight is not the
weight: a ``DTensor`` holding this rank's rows under FSDP2's ``fully_shard``, an empty partitioned parameter under
ZeRO-3. Both engines gather a module's parameters in hooks around that module's ``__call__`` (pre-forward:
all-gather; post-forward: free, and hook the outputs so that backward re-gathers before the module's backward and
reduce-scatters the gradient after it). So the op runs *inside the head module's forward*:
``CausalLMHead.apply(fn, ...)`` (and ``.logprobs``) calls the head module with its ``forward`` replaced, for that
one call, by ``fn(hidden, weight, ..., bias=bias)`` on the weight as the forward sees it. The op's backward, which
recomputes logit tiles from the saved weight, then runs inside the window the engine's pre-backward hook opens,
and the weight's gradient lands on the unsharded parameter the engine reduce-scatters -- exactly as for the
model's own ``nn.Linear`` head. An unsharded head takes the same path (the hooks are simply absent), so there is
one code path, the one the CPU tests run.

Why not ``weight.full_tensor()`` (FSDP2) or ``deepspeed.zero.GatheredParameters`` around the op: the first is a
differentiable redistribute whose backward assumes the full gradient is *replicated* (identical on every rank)
and just keeps this rank's rows -- with data parallelism each rank's gradient differs, so the cross-rank
reduction is skipped, and the gradient bypasses FSDP's reduce-scatter (and its mixed-precision / gradient-
division policy); it also materialises a second full copy of the head. The second gathers outside any module's
hooks, so the weight is released again before the op's backward (which needs it) runs, and the gradient of a
``modifier_rank=None`` gather is not partitioned back. Going through the module's own ``__call__`` is what the
engines already handle, for any engine that hooks modules.

A head grouped with other modules (``accelerate`` shards the final norm and the head as one group) is called
as a complete pass of its group that hooks no second gradient reduce-scatter (``_fsdp_standalone_call``).

A head left in FSDP2's *root* group (the usual case, and the only one for tied embeddings: the shared
``Parameter`` lives in the group of the module that owns both uses) has no hooks of its own; the root does not
reshard after forward (FSDP2 keeps the root's parameters unsharded until its post-backward), so the head module's
weight is the unsharded ``Parameter`` from the model's forward until the end of backward and the same call works.
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

    ``hidden`` ``(B, T, D)`` is the lm-head's input (dtype and device of the weight as the head's forward sees
    it); ``weight`` ``(V, D)`` and ``bias`` ``(V,)`` or None the head's parameters as they are *outside* its
    forward -- the full weight, unless FSDP2 / ZeRO-3 shard it (a ``DTensor`` / an empty partitioned
    parameter: compute with ``apply`` or ``logprobs``, which work in every case); ``softcap`` / ``temperature``
    the post-head transform as ``linear_logprobs`` options (``head_options``); ``module`` the head module whose
    ``__call__`` ``apply`` goes through (the active PEFT ``modules_to_save`` copy where there is one).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    temperature: float
    module: nn.Module | None = None

    @property
    def options(self) -> dict[str, Any]:
        """``{"softcap": ..., "temperature": ...}`` for ``linear_logprobs`` or a prefuse loss module."""
        return {"softcap": self.softcap, "temperature": self.temperature}

    def apply(self, fn, /, *args, **kwargs):
        """``fn(hidden, weight, *args, bias=bias, **kwargs)`` run inside the head module's forward.

        ``fn`` is ``prefuse.kernels.linear_logprobs`` or a prefuse loss module (anything taking
        ``(hidden, weight, ...)`` and ``bias=``); it sees the weight and bias *as the head's forward sees them*:
        gathered under FSDP2 / ZeRO-3 (module docstring), cast to ``hidden``'s dtype under autocast. Its result
        must be tensors in tuples / dicts / named tuples (a ``LossOutput`` is), so that the engines can hook
        the backward. Without ``module`` (a head built by hand) ``fn`` gets ``weight`` and ``bias`` directly.
        """
        if self.module is None:
            return fn(self.hidden, self.weight, *args, bias=self.bias, **kwargs)
        return _call_in_head_forward(self.module, self.hidden, fn, args, kwargs)

    def logprobs(
        self,
        labels: Tensor,
        *,
        shift: bool = True,
        ignore_index: int = -100,
        backend: str = "auto",
        deterministic: bool = False,
    ) -> Tensor:
        """Per-token ``log p(label)`` through ``prefuse.kernels.linear_logprobs`` (``(B, T-1)`` with shift),
        inside the head's forward (``apply``)."""
        from prefuse.kernels import linear_logprobs

        return self.apply(
            linear_logprobs,
            labels,
            ignore_index=ignore_index,
            shift=shift,
            backend=backend,
            deterministic=deterministic,
            **self.options,
        )


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
    """``(weight (V, D), bias (V,) or None)`` of ``model``'s lm-head (the tied embedding where tied), as they are
    outside the head's forward (possibly sharded: see the module docstring)."""
    return _linear_params(_active_linear(unwrap_causal_lm(model).get_output_embeddings()))


def _linear_params(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    weight = getattr(linear, "weight", None)
    # a ZeRO-3 partitioned parameter is empty outside the forward; its real shape is ``ds_shape``
    shape = getattr(weight, "ds_shape", None) if isinstance(weight, Tensor) else None
    if not isinstance(weight, Tensor) or len(weight.shape if shape is None else shape) != 2:
        raise ValueError(
            f"the lm-head {type(linear).__name__} has no (V, D) weight; prefuse needs a linear head"
        )
    bias = getattr(linear, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


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
        box["linear"] = linear
        # the weight as the forward sees it: gathered, in FSDP2's mixed-precision param_dtype
        box["dtype"], box["device"] = weight.dtype, weight.device
        # zero vocabulary rows: no work, but the head stays in the graph of the model's output
        return F.linear(
            hidden_states,
            weight[:0].to(hidden_states.device),
            None if bias is None else bias[:0].to(hidden_states.device),
        )

    head.forward = capture
    try:
        yield
    finally:
        if had_own_forward:
            head.forward = previous
        else:
            del head.forward


def forward_hidden(
    model: nn.Module, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs
) -> CausalLMHead:
    """Run ``model`` to its lm-head's input without the head matmul; return it with the head and options.

    Args:
        model: a ``*ForCausalLM``, or a wrapper of one (PEFT, DDP, DeepSpeed engine, ``torch.compile``);
            it is *called* (``model(input_ids=..., attention_mask=..., use_cache=False, **kwargs)``), so
            the wrappers' forward logic and hooks run.
        input_ids, attention_mask, **kwargs: the model's inputs (``position_ids``, ``inputs_embeds`` ...).

    Returns:
        ``CausalLMHead(hidden, weight, bias, softcap, temperature, module)``. ``hidden`` is moved to the head's
        device and dtype as its forward sees them (under autocast both are cast to the autocast dtype,
        differentiably, as ``nn.Linear`` would). Compute with ``.apply(fn, ...)`` / ``.logprobs(labels)``: they
        run inside the head module's forward, which a sharded head (FSDP2, ZeRO-3) needs.
    """
    causal_lm = unwrap_causal_lm(model)
    output_head(causal_lm)  # a clear error for a head prefuse cannot use, before the forward runs
    box: dict = {}
    kwargs.setdefault("use_cache", False)
    with _capturing_head(causal_lm, box):
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if "hidden" not in box:
        raise ValueError(
            f"{type(causal_lm).__name__}.forward never called its output-embedding module; prefuse cannot take "
            "its last hidden state"
        )
    linear = box["linear"]
    weight, bias = _linear_params(linear)
    hidden = box["hidden"]
    if input_ids is not None and hidden.dim() == 3 and hidden.shape[1] > input_ids.shape[-1]:
        hidden = hidden[:, -input_ids.shape[-1] :]  # prompt-learning PEFT prepends virtual tokens
    if hidden.device != box["device"]:  # a model split across devices ends on the head's device
        hidden = hidden.to(box["device"])
    dtype = box.get("autocast_dtype") or box["dtype"]
    if hidden.dtype != dtype:
        hidden = hidden.to(dtype)
    if weight.dtype != dtype:  # autocast: the head computes in its dtype (apply casts the live weight too)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    options = head_options(causal_lm)
    return CausalLMHead(hidden, weight, bias, options["softcap"], options["temperature"], linear)


def _call_in_head_forward(linear: nn.Module, hidden: Tensor, fn, args: tuple, kwargs: dict):
    """``linear(hidden)`` with ``linear.forward`` replaced, for this call, by ``fn`` on the live weight and bias.

    Calling the module (not ``fn`` directly) is the point: FSDP2's and ZeRO-3's hooks on it gather the weight
    around ``fn``'s forward and backward and reduce-scatter its gradient (module docstring). ``hidden`` goes
    through the call as its input, as the model's own ``hidden -> logits`` call would (FSDP2 hooks its
    post-backward on the inputs; mixed precision casts them)."""
    had_own_forward = "forward" in linear.__dict__
    previous = linear.__dict__.get("forward")

    def forward(hidden_states: Tensor):
        weight, bias = linear.weight, getattr(linear, "bias", None)
        bias = bias if isinstance(bias, Tensor) else None
        weight, bias = _unsharded_when_frozen(weight), _unsharded_when_frozen(bias)
        if weight.dtype != hidden_states.dtype:  # autocast: what nn.Linear would compute in
            weight, bias = (
                weight.to(hidden_states.dtype),
                None if bias is None else bias.to(hidden_states.dtype),
            )
        return fn(hidden_states, weight, *args, bias=bias, **kwargs)

    linear.forward = forward
    try:
        with _fsdp_standalone_call(linear):
            return linear(hidden)
    finally:
        if had_own_forward:
            linear.forward = previous
        else:
            del linear.forward


def _unsharded_when_frozen(tensor: Tensor | None) -> Tensor | None:
    """``tensor``, or its full value when it is an FSDP2 shard (a ``DTensor``) that no gradient flows to.

    A head in a root group that reshards after its forward -- TRL shards its reference model so -- is still
    sharded here (a root group has no hooks on the head). Without a gradient (a reference, under ``no_grad``)
    gathering it is all the op needs; a trained head stays unsharded in the root group until its backward."""
    if tensor is None or (tensor.requires_grad and torch.is_grad_enabled()):
        return tensor
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def _fsdp_standalone_call(module: nn.Module):
    """Within the block, a call of ``module`` after the model's forward is a complete FSDP2 pass of its group
    that registers no second post-backward hook.

    FSDP2 registers a group's post-backward (the gradient reduce-scatter) on the inputs of the first module of
    each pass, and runs its post-forward (reshard, the pre-backward hook on the output) once every module of
    the group ran. The head's input here is its input from the model's forward, already routed through that
    pass's post-backward hook; a new pass would hook it again, and for a group holding the final norm and the
    head (``accelerate``'s layout) that hook fires before the norm's backward, whose gradient then lands on
    resharded storage. So the group's parameter groups are marked as already in their forward (no second
    registration) and ``module`` as the group's only module still to run (the call completes it). Other
    engines and unsharded heads are untouched.
    """
    get_state = getattr(module, "_get_fsdp_state", None)
    state = get_state() if callable(get_state) else None
    pending = getattr(state, "_modules_to_run_forward", None)
    groups = getattr(state, "_fsdp_param_groups", None)
    if not isinstance(pending, set) or pending or groups is None:  # not FSDP2, or inside the model's forward
        yield
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    pending.add(module)
    for group in groups:
        group._training_state = TrainingState.FORWARD
    try:
        yield
    finally:
        pending.discard(module)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """PEFT adapters off within the block (the base model = the reference); ``ValueError`` if not PEFT."""
    for module in _wrapper_chain(model):
        if _is_peft(module):
            with module.disable_adapter():
                yield
            return
    raise ValueError(f"{type(model).__name__} is not a PEFT model: it has no adapter to disable")


def check_head(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, atol: float = 1e-4
) -> float:
    """Max abs difference between the model's own log-softmax and prefuse's head on ``input_ids``.

    A one-off check for an architecture this module does not know (it computes the full logits once);
    raises ``ValueError`` above ``atol``. Returns the difference.
    """
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        naive = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        fused = forward_hidden(model, input_ids, attention_mask).logprobs(input_ids)
    diff = (naive - fused).abs().max().item()
    if not diff <= atol:
        raise ValueError(f"prefuse's head differs from the model's logits by {diff:.3g} (> atol={atol})")
    return diff
