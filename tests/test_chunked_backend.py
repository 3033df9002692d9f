"""The chunked-GEMM driver (``chunked.py``) with its two pass implementations (``torch_twin.py``,
``chunked_triton.py``): the passes agree, chunking and compaction are invisible, the result is deterministic,
and the opt-in gradient filter keeps its stated error bound against float64."""

import math

import pytest
import torch
from prefuse.kernels import linear_logprobs
from prefuse.kernels.linear_logprobs import chunked, naive_token_outputs, torch_twin

BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("chunked", "cpu"), marks=pytest.mark.interpret, id="chunked-interpret"),
    pytest.param(("torch", "cuda"), marks=pytest.mark.gpu, id="torch-cuda"),
    pytest.param(("chunked", "cuda"), marks=pytest.mark.gpu, id="chunked-cuda"),
]
ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def make_inputs(shape=(3, 8), dim=16, vocab=75, device="cpu", scale=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, dim, generator=gen) * scale).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim)).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[..., :2] = -100
    return hidden.to(device), weight.to(device), targets.to(device), bias.to(device)


def run(backend, hidden, weight, targets, bias, grads_seed=1, **opts):
    """Outputs and the gradients of ``sum(g * logp + g_H * entropy)`` for hidden, weight and bias."""
    gen = torch.Generator().manual_seed(grads_seed)
    g, g_h = (torch.randn(targets.shape, generator=gen).to(hidden.device) for _ in range(2))
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    out = linear_logprobs(leaves[0], leaves[1], targets, leaves[2], outputs=ALL, backend=backend, **opts)
    grads = torch.autograd.grad((out.logp * g + out.entropy * g_h).sum(), leaves)
    return out, grads, (g, g_h)


@pytest.mark.interpret
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_triton_passes_match_their_pytorch_twins(out_dtype, softcap):
    """Both passes on the same logits: forward values and stats, and ``dl`` written into the logits' own bytes
    (half-precision ``dl`` as the first half of each fp32 row), with the filter's block maxima."""
    from prefuse.kernels.linear_logprobs import chunked_triton

    gen = torch.Generator().manual_seed(0)
    rows, vocab = 6, 75
    logits = torch.randn(rows, vocab, generator=gen) * 3
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[:2] = torch.tensor([-1, vocab + 3])  # outside the vocabulary: no target term (vocab shards)
    opts = {"softcap": softcap, "inv_temperature": 0.7, "logit_scale": 1.3}
    results = []
    for passes in (torch_twin, chunked_triton):
        logp, lse, stats = torch.zeros(rows), torch.zeros(rows), torch.zeros(rows, 4)
        passes.forward_pass(logits.clone(), bias, targets, logp, lse, stats, **opts)
        results.append((logp, lse, stats))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    lse, entropy = results[0][1], results[0][2][:, 0].contiguous()
    grad_logp, grad_entropy = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    dls = []
    for passes in (torch_twin, chunked_triton):
        buffer = logits.clone()
        dl, block_max = passes.grad_pass(buffer, bias, targets, lse, entropy, grad_logp, grad_entropy,
                                         out_dtype=out_dtype, filter_block=8, **opts)  # fmt: skip
        assert (
            dl.dtype == out_dtype and dl.shape == (rows, vocab) and block_max.shape == (math.ceil(vocab / 8),)
        )
        if passes is chunked_triton:
            assert dl.data_ptr() == buffer.data_ptr(), "the Triton pass writes dl in place"
        dls.append((dl.float(), block_max))
    torch.testing.assert_close(dls[0][0], dls[1][0], rtol=0, atol=2 * torch.finfo(out_dtype).eps)
    torch.testing.assert_close(dls[0][1], dls[1][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", BACKENDS)
def test_chunking_is_invisible(impl, monkeypatch):
    """One-row chunks give the same numbers as one chunk."""
    inputs = make_inputs(device=impl[1])
    one, one_grads, _ = run(impl[0], *inputs, softcap=4.0)
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 1)
    monkeypatch.setattr(chunked, "CHUNK_ROWS_CUDA", 1)
    assert chunked.chunk_rows(75, inputs[0].device) == 1
    many, many_grads, _ = run(impl[0], *inputs, softcap=4.0)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b)
    for a, b in zip(one_grads, many_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", BACKENDS)
def test_only_scored_rows_reach_the_gemms(impl, monkeypatch):
    """Compaction: the logits GEMMs of forward and backward see exactly the non-ignored rows."""
    rows_seen = []
    real_mm = chunked._Gemms.mm

    def counting_mm(self, a, b):
        if b.shape[0] == self.weight.shape[1] and b.shape[1] == self.weight.shape[0]:  # h @ W^T: the logits
            rows_seen.append(a.shape[0])
        return real_mm(self, a, b)

    monkeypatch.setattr(chunked._Gemms, "mm", counting_mm)
    hidden, weight, targets, bias = make_inputs(device=impl[1])
    run(impl[0], hidden, weight, targets, bias)
    n_scored = int((targets != -100).sum())
    assert sum(rows_seen) == 2 * n_scored  # forward once, backward recomputes once


@pytest.mark.parametrize("impl", BACKENDS)
def test_bitwise_deterministic(impl):
    inputs = make_inputs(device=impl[1], shape=(4, 16), vocab=300)
    first, first_grads, _ = run(impl[0], *inputs, softcap=3.0)
    second, second_grads, _ = run(impl[0], *inputs, softcap=3.0)
    for a, b in zip((*first, *first_grads), (*second, *second_grads)):
        assert torch.equal(a, b)


def _bound_inputs(device, dtype=torch.float32):
    """Peaked distributions (large logits) over 256 columns in blocks of 8: many blocks fall under eps."""
    return make_inputs(shape=(2, 6), dim=16, vocab=256, device=device, scale=8.0, dtype=dtype, seed=5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_filter_eps_none_is_exact(impl, monkeypatch):
    """``filter_eps=None`` skips nothing: bit-identical to the unfiltered path (and no column selection runs)."""
    monkeypatch.setattr(chunked, "FILTER_BLOCK_V", 8)
    selections = []
    monkeypatch.setattr(chunked, "_kept_columns", lambda *a: selections.append(a))
    inputs = _bound_inputs(impl[1])
    default, default_grads, _ = run(impl[0], *inputs)
    explicit, explicit_grads, _ = run(impl[0], *inputs, filter_eps=None)
    assert selections == []
    for a, b in zip((*default, *default_grads), (*explicit, *explicit_grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_filter_eps_error_within_the_stated_bound(impl, eps, monkeypatch):
    """Against float64: every gradient entry's error is within the bound documented in ``chunked.py``, some blocks
    were really skipped, and the log-probs are untouched."""
    monkeypatch.setattr(chunked, "FILTER_BLOCK_V", 8)
    kept = []
    real_kept = chunked._kept_columns

    def recording(*args):
        columns = real_kept(*args)
        kept.append(columns.numel())
        return columns

    monkeypatch.setattr(chunked, "_kept_columns", recording)
    hidden, weight, targets, bias = _bound_inputs(impl[1])
    opts = {"softcap": 100.0, "temperature": 0.8, "logit_scale": 1.5}
    exact, exact_grads, _ = run(impl[0], hidden, weight, targets, bias, **opts)
    out, grads, (g, g_h) = run(impl[0], hidden, weight, targets, bias, filter_eps=eps, **opts)
    assert kept and min(kept) < 256, "no block was skipped: the test would not exercise the filter"
    assert torch.equal(out.logp, exact.logp)
    assert any(not torch.equal(a, b) for a, b in zip(grads, exact_grads))

    leaves = [x.detach().double().cpu().requires_grad_() for x in (hidden, weight, bias)]
    ref = naive_token_outputs(leaves[0], leaves[1], targets.cpu(), leaves[2], **opts)
    g64, gh64 = g.double().cpu(), g_h.double().cpu()
    ref_grads = torch.autograd.grad((ref.logp * g64 + ref.entropy * gh64).sum(), leaves)
    scored = (targets != -100).cpu()
    k = opts["logit_scale"] / opts["temperature"]
    e_i = torch.where(scored, g64.abs() + gh64.abs() * (abs(math.log(eps)) + ref.entropy.detach()), 0.0)
    h64, w64 = hidden.double().cpu(), weight.double().cpu()
    bounds = (
        k * eps * e_i[..., None] * w64.abs().sum(0),  # dH[i, d]
        k
        * eps
        * torch.einsum("i,id->d", e_i.reshape(-1), h64.reshape(-1, h64.shape[-1]).abs())[None, :],  # dW
        k * eps * e_i.sum().expand(weight.shape[0]),  # db[j]
    )
    for name, got, want, bound in zip(("hidden", "weight", "bias"), grads, ref_grads, bounds):
        rounding = 1e-5 * want.abs().max()  # fp32 arithmetic, as in the unfiltered comparison
        excess = (got.double().cpu() - want).abs() - bound - rounding
        assert excess.max() <= 0, name


@pytest.mark.parametrize("impl", BACKENDS)
def test_filter_keeps_exactly_the_target_blocks_when_eps_is_huge(impl, monkeypatch):
    """With eps above every off-target probability, the kept columns are the blocks holding a target (the
    one-hot term is never dropped), and the target columns' gradient rows are exact."""
    monkeypatch.setattr(chunked, "FILTER_BLOCK_V", 8)
    kept = []
    real_kept = chunked._kept_columns
    monkeypatch.setattr(chunked, "_kept_columns", lambda *a: kept.append(real_kept(*a)) or kept[-1])
    hidden, weight, targets, bias = make_inputs(shape=(6,), vocab=256, scale=0.1, device=impl[1])
    targets[:] = torch.tensor([3, 3, 17, 200, 201, -100])
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = linear_logprobs(*leaves[:2], targets, leaves[2], backend=impl[0], filter_eps=0.5)
    grads = torch.autograd.grad(out.sum(), leaves)
    (columns,) = kept
    blocks = sorted({3 // 8, 17 // 8, 200 // 8})
    assert columns.tolist() == [c for b in blocks for c in range(8 * b, 8 * b + 8)]
    exact = linear_logprobs(*leaves[:2], targets, leaves[2], backend=impl[0])
    exact_grads = torch.autograd.grad(exact.sum(), leaves)
    torch.testing.assert_close(grads[1][columns], exact_grads[1][columns])
    torch.testing.assert_close(grads[2][columns], exact_grads[2][columns])
    skipped = torch.ones(256, dtype=torch.bool, device=impl[1])
    skipped[columns] = False
    assert (grads[1][skipped] == 0).all() and (grads[2][skipped] == 0).all()


@pytest.mark.parametrize("impl", BACKENDS)
def test_filter_with_half_precision_runs(impl, monkeypatch):
    monkeypatch.setattr(chunked, "FILTER_BLOCK_V", 8)
    hidden, weight, targets, bias = _bound_inputs(impl[1], dtype=torch.bfloat16)
    out, grads, _ = run(impl[0], hidden, weight, targets, bias, filter_eps=1e-3)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


class _RecordingKernel:
    """Stands in for a ``triton.jit`` kernel: records the constexpr keywords of each launch, then launches."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
            self.launched.add((self.kernel, tuple(sorted(constexprs.items()))))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.interpret
def test_compile_variants_cover_every_launch(monkeypatch):
    """Every constexpr combination the launchers pick (default tiles) is declared to the sm_90 compile gate."""
    from prefuse.kernels.linear_logprobs import chunked_triton

    variants = chunked_triton.compile_variants()
    declared = {(v.fn, tuple(sorted(v.constexprs.items()))) for v in variants}
    assert len({v.name for v in variants}) == len(variants)
    monkeypatch.setattr(chunked_triton, "_block_v", lambda: chunked_triton.BLOCK_V)  # the compiled tile
    launched = set()
    for name in ("_forward_pass_kernel", "_grad_pass_kernel"):
        monkeypatch.setattr(chunked_triton, name, _RecordingKernel(getattr(chunked_triton, name), launched))
    hidden, weight, targets, bias = make_inputs(shape=(4,), vocab=40)
    for softcap in (None, 2.0):
        for head_bias in (None, bias):
            for outputs, filter_eps in (((), None), (("entropy",), 1e-3), (ALL, None)):
                leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
                out = linear_logprobs(*leaves, targets, head_bias, softcap=softcap, outputs=outputs,
                                      filter_eps=filter_eps, backend="chunked")  # fmt: skip
                loss = out.sum() if not outputs else out.logp.sum() + out.entropy.sum()
                torch.autograd.grad(loss, leaves)
    assert len(launched) == 2 * 2 * (2 + 3)  # forward: stats or not; backward: plain, entropy+filter, entropy
    assert launched <= declared


def test_backend_resolution(monkeypatch):
    """``auto`` is the PyTorch twin on CPU; ``chunked`` on CPU tensors needs the Triton interpreter."""
    from prefuse.kernels.linear_logprobs import op
    from triton import knobs

    cpu = torch.device("cpu")
    assert op._resolve_backend("auto", cpu) == "torch"
    monkeypatch.setattr(knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="backend='chunked' on CPU tensors"):
        op._resolve_backend("chunked", cpu)


@pytest.mark.gpu
def test_auto_is_chunked_on_cuda():
    from prefuse.kernels.linear_logprobs import op

    assert op._resolve_backend("auto", torch.device("cuda")) == "chunked"
