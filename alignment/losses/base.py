"""Shared base of the loss modules: log-probs from hidden states through ``linear_logprobs``, the reference
(hidden states under ``no_grad`` or precomputed log-probs), and the argument checks.

Conventions: ``labels`` follow Hugging Face (aligned with ``input_ids``, ``-100`` on prompt
and padding) and the module shifts (``shift=True``: ``hidden[:, t]`` predicts ``labels[:, t+1]``); paired losses
take ``2B`` rows, chosen ``[:B]`` then rejected ``[B:]``; a sequence log-prob is the sum over its completion
tokens (labels ``!= ignore_index`` after the shift).

Every loss module has one public reduction, ``loss_from_token_logps(policy_logps, ref_logps, mask, ...)``:
the loss from per-token log-probs ``(rows, L)`` (0 where not scored; the reference also as sums ``(rows,)``)
and the completion mask ``(rows, L)``. ``forward`` computes the log-probs with ``linear_logprobs`` and calls
it; a trainer that scores tokens another way (full logits, TRL's head) calls it directly, so the loss glue
lives in one place.

Packed (padding-free) batches: every loss module also takes ``sequence_ids`` ``(1, N)`` with ``hidden``
``(1, N, D)`` and ``labels`` ``(1, N)`` (and ``kl_sequence_ids`` for KTO's / FactAlign's KL rows); see
``prefuse.alignment.packing``. A forward pre-hook lays them out per row without copying ``hidden``, so each
loss computes exactly what it computes on the padded rows, on the op path and on the loss-fused path alike (both
score the packed row in place).
"""

from __future__ import annotations

import torch
from prefuse.alignment.losses.fused import PATHS, fused_policy_loss, pair_groups
from prefuse.alignment.output import LossOutput
from prefuse.alignment.packing import PackedRows, unpack_loss_inputs
from prefuse.kernels import linear_logprobs
from prefuse.kernels.linear_logprobs.validate import validate_options
from torch import Tensor, nn

POLICY_HEAD = "policy head (hidden, weight, bias; labels are its targets)"


def check_token_mask(mask, *, paired: bool = False, name: str = "mask") -> Tensor:
    """The completion mask of a reduction: a 2-D bool tensor ``(rows, L)`` (an even number of rows when
    ``paired``), else ``ValueError`` naming ``name``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        shape = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a 2-D bool tensor (rows, L), got {shape}")
    if paired and mask.shape[0] % 2:
        raise ValueError(
            f"{name} has {mask.shape[0]} rows; a paired loss takes 2B rows (chosen, then rejected)"
        )
    return mask


def sequence_logps(name: str, logps, mask: Tensor) -> Tensor:
    """Per-row sums ``(rows,)`` (float32) of per-token log-probs ``(rows, L)`` over ``mask``; sums ``(rows,)``
    pass through. ``ValueError`` naming ``name`` for any other shape, dtype or device."""
    if not isinstance(logps, Tensor) or not logps.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {type(logps).__name__}")
    if logps.device != mask.device:
        raise ValueError(f"{name} is on {logps.device} but mask is on {mask.device}")
    if logps.shape == mask.shape:
        return torch.where(mask, logps.float(), 0.0).sum(-1)
    if logps.shape == mask.shape[:1]:
        return logps.float()
    raise ValueError(
        f"{name} must be per-token {tuple(mask.shape)} (mask's shape) or per-row sums ({mask.shape[0]},), "
        f"got {tuple(logps.shape)}"
    )


def token_logps(name: str, logps, mask: Tensor) -> Tensor:
    """Per-token log-probs ``(rows, L)`` (float32), 0 outside ``mask``; ``ValueError`` naming ``name``."""
    if not isinstance(logps, Tensor) or not logps.dtype.is_floating_point or logps.shape != mask.shape:
        shape = tuple(logps.shape) if isinstance(logps, Tensor) else type(logps).__name__
        raise ValueError(
            f"{name} must be per-token log-probs of mask's shape {tuple(mask.shape)}, got {shape}"
        )
    if logps.device != mask.device:
        raise ValueError(f"{name} is on {logps.device} but mask is on {mask.device}")
    return torch.where(mask, logps.float(), 0.0)


class FusedLinearLoss(nn.Module):
    """Base of every loss module: holds the head options and computes (reference) log-probs.

    Keyword options shared by all losses (after each loss's own hyper-parameters):

    - ``ignore_index`` (-100): label of positions that are not scored.
    - ``temperature`` (1.0), ``softcap`` (None): passed to ``linear_logprobs`` for the policy and the reference
      (Gemma-2's ``final_logit_softcapping``; ``temperature = 1 / logit_scale`` for heads that scale logits);
      ``logit_scale`` (1.0): the op's logit multiplier, applied before the softcap.
    - ``path`` ("auto"): ``"auto"`` | ``"fused"`` | ``"op"``, how the policy's head is differentiated: the
      loss-fused path (logits, loss gradient and head gradients in one pass, 3 GEMMs per policy token) or
      ``linear_logprobs`` (4 GEMMs); ``prefuse.alignment.losses.fused`` states the rules and the fallbacks.
    - ``backend`` ("auto"), ``deterministic`` (False): ``linear_logprobs`` backend options.

    Bad arguments raise ``ValueError`` naming them. A NaN or infinite hidden state on a scored position makes
    that row's log-prob NaN (``linear_logprobs``' documented choice), hence the loss NaN: no exception and no
    host sync, so a training loop that wants to skip such a step checks ``torch.isfinite(loss)``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        backend: str = "auto",
        deterministic: bool = False,
        path: str = "auto",
    ) -> None:
        super().__init__()
        validate_options(
            ignore_index, temperature, softcap, backend, logit_scale=logit_scale, deterministic=deterministic
        )
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if path == "fused" and backend == "triton":
            raise ValueError(
                "path='fused' has no form with backend='triton' (the op's first-wave kernels): use backend "
                "'auto', 'chunked' or 'torch', or path='op'"
            )
        self.path = path
        self.logit_scale = float(logit_scale)
        self.ignore_index = int(ignore_index)
        self.temperature = float(temperature)
        self.softcap = None if softcap is None else float(softcap)
        self.backend = backend
        self.deterministic = bool(deterministic)
        self.register_forward_pre_hook(unpack_loss_inputs, with_kwargs=True)

    # ------------------------------------------------------------------ checks
    def _check_rows(
        self,
        hidden,
        labels,
        *,
        hidden_name: str = "hidden",
        labels_name: str = "labels",
        paired: bool = False,
    ) -> int:
        """``hidden`` ``(rows, T, D)`` and integer ``labels`` ``(rows, T)``; paired: ``rows = 2B``.

        ``rows == 0`` is valid (a data-parallel rank without data, a last partial batch): every loss then
        returns a zero loss that back-propagates zero gradients, and still joins its all-reduces."""
        if not isinstance(hidden, (Tensor, PackedRows)) or hidden.dim() != 3:
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"{hidden_name} must be a (rows, T, D) tensor, got {shape}")
        if not isinstance(labels, Tensor):
            raise ValueError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{labels_name} must be an integer tensor, got {labels.dtype}")
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"{labels_name} has shape {tuple(labels.shape)} but {hidden_name} is {tuple(hidden.shape)}: "
                f"{labels_name} must be {hidden_name}.shape[:2] = {tuple(hidden.shape[:2])}"
            )
        rows = hidden.shape[0]
        if paired and rows % 2:
            raise ValueError(
                f"{hidden_name} has {rows} rows; a paired loss takes 2B rows (chosen [:B], then rejected [B:])"
            )
        return rows

    @staticmethod
    def _reject_reference(**refs) -> None:
        given = [name for name, value in refs.items() if value is not None]
        if given:
            raise ValueError(f"this loss is reference-free; got {', '.join(given)}")

    # ------------------------------------------------------------------ log-probs
    def _mask(self, labels: Tensor, shift: bool) -> Tensor:
        """Completion mask aligned with the per-token output: ``(rows, T-1)`` with shift, else ``(rows, T)``."""
        scored = labels[:, 1:] if shift else labels
        return scored != self.ignore_index

    def _masked_targets(self, labels: Tensor, keep: Tensor, shift: bool) -> Tensor:
        """``labels`` with the scored positions outside ``keep`` set to ``ignore_index`` (no work for the op)."""
        if not shift:
            return labels.masked_fill(~keep, self.ignore_index)
        return torch.cat([labels[:, :1], labels[:, 1:].masked_fill(~keep, self.ignore_index)], dim=1)

    def _logps(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, shift: bool
    ) -> Tensor:
        """Per-token log-probs ``(rows, L)`` through ``linear_logprobs`` (0.0 at ignored positions); packed
        ``hidden`` (``PackedRows``) is scored in place on the targets its layout gives, then laid out per row."""
        if isinstance(hidden, PackedRows):
            packed = linear_logprobs(
                hidden.hidden, weight, hidden.layout.targets(targets, shift, self.ignore_index), bias,
                ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
                logit_scale=self.logit_scale, backend=self.backend, deterministic=self.deterministic,
            )  # fmt: skip
            return hidden.layout.token_rows(packed, shift)
        return linear_logprobs(
            hidden, weight, targets, bias, ignore_index=self.ignore_index, shift=shift,
            temperature=self.temperature, softcap=self.softcap, logit_scale=self.logit_scale,
            backend=self.backend, deterministic=self.deterministic,
        )  # fmt: skip

    # ------------------------------------------------------------------ the policy's loss
    def fused_unsupported(self) -> str | None:
        """Why this loss cannot take the loss-fused path (None: it can). A loss whose terms couple the groups
        through a statistic of the policy overrides this."""
        return None

    def uses_fused_path(self, hidden, weight, bias=None) -> bool:
        """Whether a call on these tensors takes the loss-fused path (``path``, in the current grad mode).

        Raises ``ValueError`` for ``path="fused"`` on a loss that does not support it."""
        if self.path == "op":
            return False
        reason = self.fused_unsupported()
        if reason is not None:
            if self.path == "fused":
                raise ValueError(f"path='fused' is not available here: {reason}; use path='auto' or 'op'")
            return False
        if self.backend == "triton":
            return False
        leaf = hidden.hidden if isinstance(hidden, PackedRows) else hidden
        return torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (leaf, weight, bias)
        )

    def _policy_logps(self, hidden, weight, targets, bias, shift) -> Tensor | None:
        """The policy's per-token log-probs on the op path; None on the loss-fused path (``_policy_loss``
        computes them with the loss)."""
        if self.uses_fused_path(hidden, weight, bias):
            return None
        return self._head_logps(POLICY_HEAD, hidden, weight, targets, bias, shift)

    def _policy_loss(
        self, policy, hidden, weight, targets, bias, shift, loss, *, make_groups, make_chunk_loss=None
    ) -> LossOutput:
        """``loss(policy)`` on the op path (``policy`` from ``_policy_logps``); the loss-fused path when
        ``policy`` is None. Called on that path only: ``make_groups()`` returns the ``(rows,)`` group ids (rows
        that ``loss`` couples share an id) and ``make_chunk_loss()`` its ``chunk_loss`` (for a ``loss`` that
        all-reduces a reference point: the chunks use the point computed once)."""
        if policy is not None:
            return loss(policy)
        chunk_loss = make_chunk_loss() if make_chunk_loss is not None else None
        return fused_policy_loss(
            hidden, weight, targets, bias, loss, groups=make_groups(), chunk_loss=chunk_loss,
            ignore_index=self.ignore_index, shift=shift, temperature=self.temperature, softcap=self.softcap,
            logit_scale=self.logit_scale, backend=self.backend, names=POLICY_HEAD,
        )  # fmt: skip

    def _head_logps(
        self, names: str, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, shift: bool
    ) -> Tensor:
        """``_logps`` with the op's ``ValueError`` prefixed by the loss's own argument ``names`` (the op calls
        the labels ``targets``)."""
        try:
            return self._logps(hidden, weight, targets, bias, shift)
        except ValueError as err:
            raise ValueError(f"{names}: {err}") from err

    def _reference(
        self,
        *,
        hidden,
        weight,
        bias,
        logps,
        targets: Tensor,
        mask: Tensor,
        shift: bool,
        per_token: bool,
        hidden_name: str = "ref_hidden",
        logps_name: str = "ref_logps",
        what: str = "a reference",
    ) -> Tensor:
        """Reference log-probs: per-token ``(rows, L)`` (``per_token``) or per-sequence sums ``(rows,)``.

        From ``hidden`` + ``weight`` (+ ``bias``) under ``torch.no_grad()`` with ``targets``, or from the given
        ``logps`` (sums ``(rows,)`` or per-token ``(rows, L)``, detached; per-token values outside ``mask`` are
        dropped).
        """
        rows, length = mask.shape
        owner = type(self).__name__
        if hidden is not None and logps is not None:
            raise ValueError(f"pass either {hidden_name} (with ref_weight) or {logps_name}, not both")
        if hidden is not None:
            if weight is None:
                raise ValueError(
                    f"{hidden_name} needs ref_weight, the reference model's lm-head (it never defaults to weight)"
                )
            if (
                not isinstance(hidden, (Tensor, PackedRows))
                or hidden.dim() != 3
                or hidden.shape[:2] != targets.shape
            ):
                shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
                raise ValueError(
                    f"{hidden_name} must have shape ({rows}, {targets.shape[1]}, D_ref), got {shape}"
                )
            try:
                with torch.no_grad():
                    tok = self._logps(hidden, weight, targets, bias, shift)
            except ValueError as err:
                raise ValueError(f"reference head ({hidden_name}, ref_weight, ref_bias): {err}") from err
            return tok if per_token else tok.sum(-1)
        if logps is not None:
            if not isinstance(logps, Tensor) or not logps.dtype.is_floating_point:
                raise ValueError(f"{logps_name} must be a floating-point tensor")
            if logps.device != mask.device:
                raise ValueError(f"{logps_name} is on {logps.device} but labels are on {mask.device}")
            logps = logps.detach().float()
            if logps.shape == (rows,):
                if per_token:
                    raise ValueError(
                        f"{owner} needs per-token {logps_name} of shape ({rows}, {length}) (as linear_logprobs "
                        f"returns them), not per-sequence sums"
                    )
                return logps
            if logps.shape == (rows, length):
                tok = torch.where(mask, logps, 0.0)
                return tok if per_token else tok.sum(-1)
            raise ValueError(
                f"{logps_name} must be per-sequence sums ({rows},) or per-token ({rows}, {length}), "
                f"got {tuple(logps.shape)}"
            )
        raise ValueError(
            f"{owner} needs {what}: pass {hidden_name} and ref_weight (and ref_bias), or {logps_name}"
        )

    def extra_repr(self) -> str:
        opts = [f"ignore_index={self.ignore_index}", f"backend={self.backend!r}", f"path={self.path!r}"]
        if self.temperature != 1.0:
            opts.append(f"temperature={self.temperature}")
        if self.softcap is not None:
            opts.append(f"softcap={self.softcap}")
        if self.logit_scale != 1.0:
            opts.append(f"logit_scale={self.logit_scale}")
        return ", ".join(opts)


class PairedLoss(FusedLinearLoss):
    """Base of the paired losses: ``2B`` rows, chosen ``[:B]`` then rejected ``[B:]``."""

    def _paired_loss(
        self, hidden, weight, labels, bias, shift, *, ref_hidden=None, ref_weight=None, ref_bias=None,
        ref_logps=None, reference: bool = True, **batch,
    ) -> LossOutput:  # fmt: skip
        """A paired loss's forward: per-token policy log-probs ``(2B, L)``, reference sums ``(2B,)`` (none when
        ``reference`` is False) and the completion mask ``(2B, L)`` into ``loss_from_token_logps(policy, ref,
        mask, **batch)`` -- on the op path, or per pair on the loss-fused path. ``batch``: the loss's per-pair
        inputs (GPO's scores, SPPO's win rates)."""
        self._check_rows(hidden, labels, paired=True)
        if not isinstance(shift, bool):
            raise ValueError(f"shift must be a bool, got {shift!r}")
        mask = self._mask(labels, shift)
        policy = self._policy_logps(hidden, weight, labels, bias, shift)
        ref = None
        if reference:
            ref = self._reference(
                hidden=ref_hidden, weight=ref_weight, bias=ref_bias, logps=ref_logps, targets=labels, mask=mask,
                shift=shift, per_token=False,
            )  # fmt: skip
        return self._policy_loss(
            policy, hidden, weight, labels, bias, shift,
            lambda tok: self.loss_from_token_logps(tok, ref, mask, **batch),
            make_groups=lambda: pair_groups(mask.shape[0], mask.device),
        )  # fmt: skip

    @staticmethod
    def _pair_sums(policy_logps, ref_logps, mask, *, reference: bool = True):
        """``(policy, ref, lengths, B)``: ``(2B,)`` sums and completion lengths of a paired reduction's inputs
        (``ref`` None when reference-free, where ``ref_logps`` must be None)."""
        mask = check_token_mask(mask, paired=True)
        policy = sequence_logps("policy_logps", policy_logps, mask)
        if not reference:
            if ref_logps is not None:
                raise ValueError("this loss is reference-free; got ref_logps")
            ref = None
        elif ref_logps is None:
            raise ValueError("ref_logps is required: per-token (2B, L) or per-row sums (2B,)")
        else:
            ref = sequence_logps("ref_logps", ref_logps.detach(), mask)
        return policy, ref, mask.sum(-1), mask.shape[0] // 2


class ReferenceFreePairedLoss(PairedLoss):
    """Base of SimPO / ORPO / CPO: the paired forward without a reference; subclasses give ``_pair_loss``."""

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """``hidden`` ``(2B, T, D)``, ``labels`` ``(2B, T)``; reference-free (``ref_*`` must be None)."""
        self._reject_reference(
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps
        )
        return self._paired_loss(hidden, weight, labels, bias, shift, reference=False)

    def loss_from_token_logps(self, policy_logps: Tensor, ref_logps: None, mask: Tensor) -> LossOutput:
        """The loss from the policy's per-token log-probs ``(2B, L)`` (or sums ``(2B,)``) and the completion
        mask ``(2B, L)``; ``ref_logps`` must be None (reference-free)."""
        policy, _, lengths, b = self._pair_sums(policy_logps, ref_logps, mask, reference=False)
        return self._pair_loss(policy[:b], policy[b:], lengths[:b], lengths[b:])

    def _pair_loss(
        self, chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
    ) -> LossOutput:
        """The loss from ``(B,)`` completion log-prob sums and completion lengths."""
        raise NotImplementedError
