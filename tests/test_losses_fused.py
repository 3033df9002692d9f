"""The loss-fused path (``prefuse.alignment.losses.fused``) against the op path and a float64 naive head.

Every loss and loss type that supports the path runs three ways on the same inputs: ``path="fused"``,
``path="op"`` (``linear_logprobs``), and the op path's loss on per-token log-probs from full float64 logits with
autograd (the module's ``_logps`` swapped for ``naive_linear_logprobs`` on float64 leaves). Loss, metrics and the
gradients of hidden, weight and bias must agree; with a tiny chunk budget as well (many chunks, groups larger
than the budget). Then: the GEMM count, the fallbacks, the path rules, gradient scaling, a frozen head.
"""

from __future__ import annotations

import math

import pytest
import torch
from prefuse.alignment import (
    CPOLoss,
    DPOLoss,
    FactAlignLoss,
    GPOLoss,
    KTOLoss,
    ORPOLoss,
    SamPOLoss,
    SimPOLoss,
    SPPOLoss,
)
from prefuse.alignment.functional import DPO_LOSS_TYPES
from prefuse.alignment.losses import base as loss_base
from prefuse.alignment.losses.fused import linked_row_groups, pair_groups
from prefuse.kernels.linear_logprobs import chunked, naive_linear_logprobs
from test_losses_factalign import make_sentences
from test_losses_reference import IGNORE, make_labels
from torch.utils._python_dispatch import TorchDispatchMode

B, T, D, V = 3, 9, 13, 37  # odd sizes; 2B = 6 paired rows, 6 unpaired rows

SUPPORTED_DPO = [t for t in DPO_LOSS_TYPES if t != "bco_pair"]


def _module(method: str, path: str, options: dict, **over):
    opts = {**options, "path": path}
    if method.startswith("dpo:"):
        smoothing = 0.1 if method[4:] in ("exo_pair", "robust") else 0.0
        return DPOLoss(0.2, method[4:], smoothing, nll_weight=over.get("nll", 0.0), **opts)
    if method == "sampo":
        return SamPOLoss(0.2, seed=11, nll_weight=over.get("nll", 0.0), **opts)
    if method == "kto":
        return KTOLoss(0.3, desirable_weight=1.2, undesirable_weight=0.7, **opts)
    if method == "factalign":
        return FactAlignLoss(0.3, fg_beta=0.4, **opts)
    if method == "sppo":
        return SPPOLoss(0.05, **opts)
    if method == "gpo":
        return GPOLoss(0.05, clamp=3.0, **opts)
    if method == "simpo":
        return SimPOLoss(0.5, gamma=0.3, label_smoothing=0.1, nll_weight=over.get("nll", 0.0), **opts)
    if method == "orpo":
        return ORPOLoss(0.2, nll_weight=over.get("nll", 1.0), **opts)
    return CPOLoss(0.2, label_smoothing=0.1, nll_weight=over.get("nll", 1.0), average_log_prob=True, **opts)


class Inputs:
    """One batch of ``method``'s inputs in ``dtype``; the policy head as leaves of that dtype and float64."""

    def __init__(
        self,
        method: str,
        dtype: torch.dtype,
        seed: int,
        *,
        bias: bool = True,
        ref: str = "hidden",
        device: str = "cpu",
    ):
        gen = torch.Generator().manual_seed(seed)
        self.method, self.ref = method, ref
        rows = 2 * B
        self.unpaired = method in ("kto", "factalign")
        self.labels = make_labels(rows, T, V, gen)
        self.labels[1, :] = (
            IGNORE  # a row (chosen of pair 1; an example of KTO) whose completion is all ignored
        )

        def cast(x):
            return x.to(dtype)

        self.hidden = cast(torch.randn(rows, T, D, generator=gen) * 1.5)
        self.weight = cast(torch.randn(V, D, generator=gen) / math.sqrt(D) * 2)
        self.bias = cast(torch.randn(V, generator=gen) * 0.5) if bias else None
        self.ref_hidden = cast(torch.randn(rows, T, D, generator=gen))
        self.ref_weight = cast(torch.randn(V, D, generator=gen) / math.sqrt(D) * 2)
        mask = self.labels[:, 1:] != IGNORE
        self.ref_tokens = torch.where(mask, torch.rand(rows, T - 1, generator=gen) * -4, 0.0)
        self.extra = {}
        if method == "sppo":
            self.extra = {
                "p_chosen": torch.rand(B, generator=gen),
                "p_rejected": torch.rand(B, generator=gen),
            }
        if method == "gpo":
            self.extra = {
                "s_chosen": torch.randn(B, generator=gen),
                "s_rejected": torch.randn(B, generator=gen),
            }
        if self.unpaired:
            self.desirable = torch.tensor([True, False, True, True, False, False])
            self.kl_labels = make_labels(rows, T, V, gen)
            self.kl_hidden = cast(torch.randn(rows, T, D, generator=gen))
            self.ref_kl_hidden = cast(torch.randn(rows, T, D, generator=gen))
        if method == "factalign":
            self.sentence_ids, n = make_sentences(self.labels, gen, skip=0.1)
            self.sentence_labels = torch.rand(n, generator=gen) < 0.5
            self.kl_sentence_ids, _ = make_sentences(self.kl_labels, gen)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        self.extra = {name: value.to(device) for name, value in self.extra.items()}

    def leaves(self, *, double: bool = False, grads=(True, True, True)):
        """Fresh leaves ``(hidden, weight, bias)``; float64 copies of the same values when ``double``."""
        out = []
        for t, g in zip((self.hidden, self.weight, self.bias), grads):
            if t is None:
                out.append(None)
                continue
            t = t.detach().double() if double else t.detach().clone()
            out.append(t.requires_grad_(g))
        return out

    def call(self, module, hidden, weight, bias):
        ref_w = self.ref_weight.to(hidden.dtype)
        if self.method in ("simpo", "orpo", "cpo"):
            refs = {}
        elif self.ref == "hidden":
            refs = {"ref_hidden": self.ref_hidden.to(hidden.dtype), "ref_weight": ref_w}
        elif self.ref == "sums" and self.method != "sampo" and self.method != "factalign":
            refs = {"ref_logps": self.ref_tokens.sum(-1)}
        else:
            refs = {"ref_logps": self.ref_tokens}
        kwargs = {"bias": bias, **refs, **self.extra}
        if not self.unpaired:
            return module(hidden, weight, self.labels, **kwargs)
        kl_ref = {"ref_kl_hidden": self.ref_kl_hidden.to(hidden.dtype)} if "ref_weight" in refs else {}
        if not kl_ref:  # a reference given as log-probs: the KL rows' as well
            kwargs["kl"] = 0.2
            if self.method == "factalign":
                kwargs["fg_kl"] = 0.1
        else:
            kwargs.update(kl_hidden=self.kl_hidden.to(hidden.dtype), kl_labels=self.kl_labels, **kl_ref)
        if self.method == "factalign":
            kwargs.update(sentence_ids=self.sentence_ids, sentence_labels=self.sentence_labels)
            if kl_ref:
                kwargs["kl_sentence_ids"] = self.kl_sentence_ids
        return module(hidden, weight, self.labels, self.desirable, **kwargs)


def _naive64(module):
    """``module`` (op path) scoring every head with full float64 logits (policy with autograd)."""

    def logps(hidden, weight, targets, bias, shift):
        return naive_linear_logprobs(
            hidden.double(), weight.double(), targets, None if bias is None else bias.double(),
            ignore_index=module.ignore_index, shift=shift, temperature=module.temperature, softcap=module.softcap,
            logit_scale=module.logit_scale,
        )  # fmt: skip

    module._logps = logps
    return module


def _run(module, inputs: Inputs, *, double: bool = False, grads=(True, True, True)):
    leaves = inputs.leaves(double=double, grads=grads)
    out = inputs.call(module, *leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    got = torch.autograd.grad(out.loss, wanted)
    it = iter(got)
    return out, [next(it) if t is not None and t.requires_grad else None for t in leaves]


def _close(a, b, tol, what):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1.0) if b.numel() else 1.0
    torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _compare(fused, other, tol, label):
    (out_f, grads_f), (out_o, grads_o) = fused, other
    _close(out_f.loss, out_o.loss, tol, f"{label} loss")
    assert set(out_f.metrics) == set(out_o.metrics)
    for key, value in out_o.metrics.items():
        assert not out_f.metrics[key].requires_grad
        _close(out_f.metrics[key], value, tol, f"{label} metric {key}")
    for name, gf, go in zip(("hidden", "weight", "bias"), grads_f, grads_o):
        assert (gf is None) == (go is None), name
        if gf is not None:
            assert gf.dtype == go.dtype or label == "float64"
            _close(gf, go, tol, f"{label} grad {name}")


CASES = [
    *[(f"dpo:{t}", {}) for t in SUPPORTED_DPO],
    ("dpo:sigmoid", {"nll": 0.4}),
    ("sampo", {}),
    ("sampo", {"nll": 0.3}),
    ("kto", {}),
    ("factalign", {}),
    ("sppo", {}),
    ("gpo", {}),
    ("simpo", {"nll": 0.5}),
    ("orpo", {}),
    ("cpo", {}),
]
OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"softcap": 3.0, "temperature": 0.7, "logit_scale": 1.3}, id="softcap-temperature-scale"),
]


@pytest.fixture(params=["one-chunk", "tiny-chunks"])
def budget(request, monkeypatch):
    """The default chunk budget (the whole batch in one chunk) or 3 tokens (a chunk per group, most groups over
    the budget)."""
    if request.param == "tiny-chunks":
        monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 3 * 4 * V)
    return request.param


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(("method", "over"), CASES, ids=[f"{m}{'-nll' if o else ''}" for m, o in CASES])
def test_fused_equals_op_and_float64(method, over, options, budget):
    inputs = Inputs(method, torch.float32, seed=sum(map(ord, method)), bias=method != "gpo")
    fused_module = _module(method, "fused", options, **over)
    fused = _run(fused_module, inputs)
    assert fused_module.uses_fused_path(*inputs.leaves())
    op = _run(_module(method, "op", options, **over), inputs)
    naive = _run(_naive64(_module(method, "op", options, **over)), inputs, double=True)
    _compare(fused, op, 2e-5, "op")
    _compare(fused, naive, 2e-4, "float64")


@pytest.mark.parametrize("ref", ["sums", "tokens"])
@pytest.mark.parametrize("method", ["dpo:sigmoid", "sampo", "kto", "factalign", "sppo"])
def test_fused_with_reference_log_probs(method, ref):
    inputs = Inputs(method, torch.float32, seed=7, ref=ref)
    fused = _run(_module(method, "fused", {}), inputs)
    _compare(fused, _run(_module(method, "op", {}), inputs), 2e-5, "op")
    _compare(fused, _run(_naive64(_module(method, "op", {})), inputs, double=True), 2e-4, "float64")


@pytest.mark.parametrize("method", ["dpo:sigmoid", "dpo:ipo", "sampo", "kto", "factalign", "orpo"])
def test_fused_bfloat16(method, budget):
    """bf16 inputs: the same fp32 arithmetic as the op path; gradients within bf16 rounding of float64."""
    inputs = Inputs(method, torch.bfloat16, seed=3)
    fused = _run(_module(method, "fused", {"softcap": 4.0}), inputs)
    _compare(fused, _run(_module(method, "op", {"softcap": 4.0}), inputs), 2e-2, "op")
    _compare(
        fused, _run(_naive64(_module(method, "op", {"softcap": 4.0})), inputs, double=True), 2e-2, "float64"
    )


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (True, True, False)])
def test_fused_frozen_parts(grads):
    """Only what requires grad gets a gradient (a frozen head: hidden only; a frozen body: the head only)."""
    inputs = Inputs("dpo:sigmoid", torch.float32, seed=5)
    fused = _run(_module("dpo:sigmoid", "fused", {}), inputs, grads=grads)
    _compare(fused, _run(_module("dpo:sigmoid", "op", {}), inputs, grads=grads), 2e-5, "op")


def test_fused_gradient_scales_with_the_upstream_gradient():
    inputs = Inputs("kto", torch.float32, seed=9)
    module = _module("kto", "fused", {})
    h, w, b = inputs.leaves()
    out = inputs.call(module, h, w, b)
    once = torch.autograd.grad(out.loss, (h, w, b), retain_graph=True)
    scaled = torch.autograd.grad(2.5 * out.loss + out.loss.detach() ** 2, (h, w, b))
    for g1, g2 in zip(once, scaled):
        torch.testing.assert_close(g2, 2.5 * g1)


class _Gemms(TorchDispatchMode):
    """Records ``(m, k, n)`` of every matrix product (``mm``, ``addmm``, ``addmm_``) run under it."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            a, b = args[-2:] if func is not torch.ops.aten.mm.default else args
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("grads", "gemms"), [((True, True, True), 3), ((True, False, False), 2)])
def test_gemm_count(grads, gemms):
    """The loss-fused path runs 3 GEMMs over the scored policy tokens (2 with a frozen head), none recomputed:
    logits ``(N, D) x (D, V)``, ``dH = dl W`` ``(N, V) x (V, D)``, ``dW = dlᵀ H`` ``(V, N) x (N, D)``."""
    inputs = Inputs(
        "dpo:sigmoid", torch.float32, seed=1, ref="sums"
    )  # no reference head: its GEMM is not counted
    h, w, b = inputs.leaves(grads=grads)
    with _Gemms() as counter:
        out = inputs.call(_module("dpo:sigmoid", "fused", {}), h, w, b)
        out.loss.backward()
    n = int((inputs.labels[:, 1:] != IGNORE).sum())
    expected = [(n, D, V), (n, V, D), (V, n, D)][:gemms]
    assert sorted(counter.shapes) == sorted(expected)


def test_bco_pair_falls_back_to_the_op_path(monkeypatch):
    module = DPOLoss(loss_type="bco_pair")
    assert "bco_pair" in module.fused_unsupported()
    inputs = Inputs("dpo:bco_pair", torch.float32, seed=2)
    assert not module.uses_fused_path(*inputs.leaves())

    def refuse(*args, **kwargs):
        raise AssertionError("the loss-fused path ran")

    monkeypatch.setattr(loss_base, "fused_policy_loss", refuse)
    out, grads = _run(module, inputs)
    assert out.loss.isfinite() and all(g is not None for g in grads)
    with pytest.raises(ValueError, match="path='fused'.*bco_pair"):
        inputs.call(DPOLoss(loss_type="bco_pair", path="fused"), *inputs.leaves())


@pytest.mark.parametrize(("method", "over"), CASES, ids=[f"{m}{'-nll' if o else ''}" for m, o in CASES])
def test_every_supported_loss_takes_the_fused_path_on_auto(method, over, monkeypatch):
    calls = []
    original = loss_base.fused_policy_loss
    monkeypatch.setattr(loss_base, "fused_policy_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    module = _module(method, "auto", {}, **over)
    assert module.fused_unsupported() is None
    inputs = Inputs(method, torch.float32, seed=4)
    inputs.call(module, *inputs.leaves())
    assert calls == [1]


def test_path_rules():
    inputs = Inputs("dpo:sigmoid", torch.float32, seed=6)
    auto = DPOLoss()
    assert auto.path == "auto" and auto.uses_fused_path(*inputs.leaves())
    with torch.no_grad():
        assert not auto.uses_fused_path(*inputs.leaves())  # no gradient: the op's one GEMM
    assert not auto.uses_fused_path(*inputs.leaves(grads=(False, False, False)))
    assert not DPOLoss(backend="triton").uses_fused_path(*inputs.leaves())  # the op's Triton kernels
    assert not DPOLoss(path="op").uses_fused_path(*inputs.leaves())
    with pytest.raises(ValueError, match="path must be one of"):
        DPOLoss(path="fast")
    with pytest.raises(ValueError, match="path='fused'.*backend='triton'"):
        KTOLoss(path="fused", backend="triton")
    with pytest.raises(ValueError, match="targets holds"):
        bad = inputs.labels.clone()
        bad[0, -1] = V
        DPOLoss(path="fused")(*inputs.leaves()[:2], bad, ref_logps=inputs.ref_tokens)


def test_factalign_sentences_spanning_rows_link_the_rows(monkeypatch):
    ids = torch.tensor([[0, 0, -1], [1, -1, 2], [-1, 3, 3], [2, 4, -1], [5, 5, 5]])
    assert linked_row_groups(ids).tolist() == [0, 1, 2, 1, 4]
    assert linked_row_groups(torch.full((3, 2), -1)).tolist() == [0, 1, 2]
    assert pair_groups(6, torch.device("cpu")).tolist() == [0, 1, 2, 0, 1, 2]
    # a sentence over rows 0 and 3 (ids numbered over the batch, nothing forbids it): still exact, in tiny chunks
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 3 * 4 * V)
    inputs = Inputs("factalign", torch.float32, seed=8)
    first = int(inputs.sentence_ids[0].max())
    inputs.sentence_ids[3] = torch.where(inputs.sentence_ids[3] >= 0, first, -1)
    fused = _run(_module("factalign", "fused", {}), inputs)
    _compare(fused, _run(_module("factalign", "op", {}), inputs), 2e-5, "op")
    _compare(fused, _run(_naive64(_module("factalign", "op", {})), inputs, double=True), 2e-4, "float64")


def test_non_finite_hidden_gives_a_nan_loss_as_the_op_path():
    inputs = Inputs("dpo:sigmoid", torch.float32, seed=10)
    inputs.hidden[0, 5, 2] = float("inf")
    inputs.labels[0, 6] = 1  # position 5 predicts label 6: scored
    out = inputs.call(_module("dpo:sigmoid", "fused", {"softcap": 5.0}), *inputs.leaves())
    assert out.loss.isnan()


def test_empty_batch():
    hidden = torch.zeros(0, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    out = DPOLoss(path="fused")(hidden, weight, torch.zeros(0, T, dtype=torch.long), ref_logps=torch.zeros(0))
    out.loss.backward()
    assert out.loss.item() == 0.0 and weight.grad.abs().sum() == 0


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["dpo:sigmoid", "kto"])
def test_fused_with_the_triton_passes(method, dtype):
    """backend='chunked': the op's Triton passes (interpreted here) inside the loss-fused path."""
    options = {"softcap": 3.0, "logit_scale": 1.3, "backend": "chunked"}
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    inputs = Inputs(method, dtype, seed=12)
    fused = _run(_module(method, "fused", options), inputs)
    _compare(fused, _run(_module(method, "op", {**options, "backend": "torch"}), inputs), tol, "op")
    _compare(fused, _run(_naive64(_module(method, "op", options)), inputs, double=True), 10 * tol, "float64")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["dpo:sigmoid", "sampo", "kto", "factalign"])
def test_fused_on_cuda(method, dtype):
    """On CUDA (cuBLAS GEMMs with fp32 accumulation, the Triton passes): fused == op == float64."""
    options = {"softcap": 3.0, "logit_scale": 1.3}
    tol = (
        2e-4 if dtype == torch.float32 else 2e-2
    )  # fp32 GEMMs may use TF32-free cuBLAS paths: still 1e-4 level
    inputs = Inputs(method, dtype, seed=13, device="cuda")
    fused = _run(_module(method, "fused", options), inputs)
    _compare(fused, _run(_module(method, "op", options), inputs), tol, "op")
    _compare(fused, _run(_naive64(_module(method, "op", options)), inputs, double=True), 10 * tol, "float64")
