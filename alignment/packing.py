"""Packed (padding-free) batches: many sequences concatenated into one row, ``sequence_ids`` saying which.

A packed batch holds ``hidden`` ``(1, N, D)``, ``labels`` ``(1, N)`` and ``sequence_ids`` ``(1, N)``: token
``i`` belongs to row ``sequence_ids[0, i]`` (``0..R-1``) of the batch it packs, ``-1`` marks padding. Rows keep
their meaning (paired losses: rows ``[:B]`` chosen, ``[B:]`` rejected). Token ``i`` is at position ``p_i`` of its
row, ``p_i`` = the number of earlier tokens of the same row, so a row's tokens are read in packed order; the
padded layout of the same batch puts token ``i`` at ``[sequence_ids[i], p_i]``.

The losses never copy ``hidden``: ``PackedLayout.targets`` gives the op, for every packed token, the label that
the padded layout would make it predict -- with ``shift``, the next label **of the same sequence**
(``ignore_index`` at a sequence's last token), so no prediction crosses a boundary -- and the per-token
log-probs ``(1, N)`` are scattered into the per-row layout ``(R, L)`` the reductions consume
(``PackedLayout.token_rows``; O(tokens)). Everything downstream of the per-token log-probs -- sums, SamPO's
sample (drawn on the per-row completion mask, so it depends on the rows' tokens and the seed only), FactAlign's
sentences -- is then the padded computation itself.

Per-token reference log-probs in the packed layout are ``(1, N)``: entry ``i`` is the log-prob of the token
that token ``i`` predicts, as ``linear_logprobs(ref_hidden, ref_weight, packed_targets(labels, sequence_ids))``
returns them (no ``shift``: the targets are already shifted within each sequence).
"""

from __future__ import annotations

import torch
from torch import Tensor

PACKED_ROW_KEYS = ("hidden", "labels")
"""Positional arguments of a loss's ``forward`` (index 0 and 2) that a packed batch lays out per row."""


class PackedLayout:
    """Where each token of a packed row sits in the per-row layout ``(rows, length)``.

    Args:
        sequence_ids: ``(1, N)`` integer tensor, ``-1`` (padding) or the token's row ``0..R-1``.
        name: the argument's name in error messages.

    ``rows`` is ``max(sequence_ids) + 1`` and ``length`` the longest row's token count (one host sync, when
    the layout is built).
    """

    def __init__(self, sequence_ids, *, name: str = "sequence_ids") -> None:
        if not isinstance(sequence_ids, Tensor) or sequence_ids.dim() != 2 or sequence_ids.shape[0] != 1:
            shape = (
                tuple(sequence_ids.shape) if isinstance(sequence_ids, Tensor) else type(sequence_ids).__name__
            )
            raise ValueError(f"{name} must be a (1, N) tensor (one packed row), got {shape}")
        if (
            sequence_ids.dtype.is_floating_point
            or sequence_ids.dtype.is_complex
            or sequence_ids.dtype == torch.bool
        ):
            raise ValueError(f"{name} must be an integer tensor, got {sequence_ids.dtype}")
        flat = sequence_ids.reshape(-1).long()
        if flat.numel() and int(flat.min()) < -1:
            raise ValueError(f"{name} must be -1 (padding) or a row index >= 0, got {int(flat.min())}")
        self.name = name
        self.numel = flat.numel()
        self.index = (flat >= 0).nonzero().squeeze(1)  # packed positions of the tokens
        self.row = flat[self.index]
        self.rows = int(self.row.max()) + 1 if self.row.numel() else 0
        counts = torch.bincount(self.row, minlength=self.rows)
        self.length = int(counts.max()) if self.rows else 0
        starts = counts.cumsum(0) - counts
        order = torch.argsort(self.row, stable=True)
        self.position = torch.empty_like(self.row)
        self.position[order] = torch.arange(self.row.numel(), device=flat.device) - starts[self.row[order]]
        self.count = counts

    def check(self, value, name: str, *, dims: int = 2) -> Tensor:
        """``value`` must be a tensor of shape ``(1, N)`` (``dims=3``: ``(1, N, D)``)."""
        if not isinstance(value, Tensor) or value.dim() != dims or tuple(value.shape[:2]) != (1, self.numel):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            want = f"(1, {self.numel})" if dims == 2 else f"(1, {self.numel}, D)"
            raise ValueError(f"{name} must be {want} like {self.name}, got {shape}")
        return value

    def to_rows(self, values: Tensor, fill, name: str) -> Tensor:
        """Packed ``(1, N)`` values -> the per-row layout ``(rows, length)``, ``fill`` elsewhere."""
        flat = self.check(values, name).reshape(-1)
        out = torch.full((self.rows, self.length), fill, dtype=flat.dtype, device=flat.device)
        return out.index_put((self.row, self.position), flat[self.index])

    def targets(self, row_targets: Tensor, shift: bool, ignore_index: int) -> Tensor:
        """The op's targets ``(1, N)`` for per-row targets ``(rows, length)``: token ``i`` predicts the label at
        ``[row_i, p_i + 1]`` (``shift``) or ``[row_i, p_i]``; ``ignore_index`` past its row's end and on padding."""
        pos = self.position + 1 if shift else self.position
        inside = pos < self.count[self.row]
        picked = row_targets[self.row, pos.clamp(max=max(self.length - 1, 0))]
        out = torch.full((self.numel,), ignore_index, dtype=row_targets.dtype, device=row_targets.device)
        out[self.index] = torch.where(inside, picked, ignore_index)
        return out.unsqueeze(0)

    def packed_index(self, width: int) -> Tensor:
        """``(rows, width)``: the packed position of the token at ``[row, p]`` of the per-row layout, 0 where the
        row has no token ``p`` (the loss-fused path's map from per-row positions to packed hidden rows)."""
        out = torch.zeros((self.rows, width), dtype=torch.long, device=self.index.device)
        keep = self.position < width
        return out.index_put((self.row[keep], self.position[keep]), self.index[keep])

    def token_rows(self, packed: Tensor, shift: bool, name: str = "log-probs") -> Tensor:
        """Per-token values ``(1, N)`` of the op (as ``targets`` aligns them) -> ``(rows, length - 1)`` with
        ``shift`` (``(rows, length)`` without), the layout ``linear_logprobs(..., shift=shift)`` gives padded
        rows. Differentiable (an index, no in-place write)."""
        flat = self.check(packed, name).reshape(-1)
        width = max(self.length - 1, 0) if shift else self.length
        keep = self.position < width
        out = flat.new_zeros((self.rows, width))
        return out.index_put((self.row[keep], self.position[keep]), flat[self.index[keep]])


class PackedRows:
    """Packed hidden states ``(1, N, D)`` seen as the rows ``(rows, length, D)`` of ``layout`` without a copy:
    ``shape`` / ``dim()`` / ``device`` / ``dtype`` describe the per-row view, ``hidden`` is the packed tensor."""

    def __init__(self, hidden, layout: PackedLayout, name: str = "hidden") -> None:
        self.hidden = layout.check(hidden, name, dims=3)
        self.layout = layout

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layout.rows, self.layout.length, self.hidden.shape[-1]))

    def dim(self) -> int:
        return 3

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


def packed_targets(
    labels: Tensor, sequence_ids: Tensor, *, shift: bool = True, ignore_index: int = -100
) -> Tensor:
    """Targets ``(1, N)`` for ``linear_logprobs(hidden, weight, targets)`` (no ``shift``) on a packed row: with
    ``shift`` each token's target is the next label of its own sequence (``ignore_index`` at a sequence's last
    token and on padding)."""
    layout = PackedLayout(sequence_ids)
    return layout.targets(layout.to_rows(labels, ignore_index, "labels"), shift, ignore_index)


def unpack_token_logps(
    logps: Tensor, labels: Tensor, sequence_ids: Tensor, *, shift: bool = True, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Packed per-token log-probs ``(1, N)`` (as ``linear_logprobs`` returns them on ``packed_targets``) ->
    ``(logps (R, L), mask (R, L))`` in the per-row layout, the inputs of every loss's ``loss_from_token_logps``
    and of the functional forms that take per-token log-probs (``L = length - 1`` with ``shift``)."""
    layout = PackedLayout(sequence_ids)
    rows = layout.to_rows(labels, ignore_index, "labels")
    mask = (rows[:, 1:] if shift else rows) != ignore_index
    return layout.token_rows(logps, shift, "logps"), mask


# ---------------------------------------------------------------------------------------------- loss inputs
_MAIN = {"ref_hidden": "hidden", "ref_logps": "logps", "sentence_ids": "ids"}
_KL = {
    "kl_hidden": "hidden",
    "ref_kl_hidden": "hidden",
    "kl_labels": "labels",
    "ref_kl_logps": "logps",
    "kl_sentence_ids": "ids",
}


def _lay_out(layout: PackedLayout, kind: str, value, name: str, *, shift: bool, ignore_index: int):
    if kind == "hidden":
        return PackedRows(value, layout, name)
    if kind == "labels":
        return layout.to_rows(value, ignore_index, name)
    if kind == "ids":
        return layout.to_rows(value, -1, name)
    # logps: per-token in the packed layout; per-row sums (rows,) pass through
    if isinstance(value, Tensor) and value.dim() == 2:
        return layout.token_rows(value, shift, name)
    return value


def unpack_loss_inputs(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A loss module's forward pre-hook: with ``sequence_ids`` (and / or ``kl_sequence_ids`` for the KL rows)
    the packed arguments are laid out per row -- hidden states as ``PackedRows`` (no copy), labels, sentence
    ids and per-token reference log-probs in the padded layout -- and the loss's own ``forward`` runs as on
    padded rows. Without them (or with them None) the call is unchanged."""
    sequence_ids = kwargs.pop("sequence_ids", None)
    kl_sequence_ids = kwargs.pop("kl_sequence_ids", None)
    if sequence_ids is None and kl_sequence_ids is None:
        return args, kwargs
    shift = kwargs.get("shift", True)
    ignore = module.ignore_index
    args = list(args)
    if sequence_ids is not None:
        layout = PackedLayout(sequence_ids)
        for name, position in (("hidden", 0), ("labels", 2)):
            kind = name
            if name in kwargs:
                kwargs[name] = _lay_out(layout, kind, kwargs[name], name, shift=shift, ignore_index=ignore)
            elif len(args) > position:
                args[position] = _lay_out(
                    layout, kind, args[position], name, shift=shift, ignore_index=ignore
                )
        for name, kind in _MAIN.items():
            if kwargs.get(name) is not None:
                kwargs[name] = _lay_out(layout, kind, kwargs[name], name, shift=shift, ignore_index=ignore)
    if kl_sequence_ids is not None:
        if kwargs.get("kl_hidden") is None or kwargs.get("kl_labels") is None:
            raise ValueError("kl_sequence_ids lays out the KL rows: it needs kl_hidden and kl_labels")
        kl_layout = PackedLayout(kl_sequence_ids, name="kl_sequence_ids")
        for name, kind in _KL.items():
            if kwargs.get(name) is not None:
                kwargs[name] = _lay_out(kl_layout, kind, kwargs[name], name, shift=shift, ignore_index=ignore)
    return tuple(args), kwargs
