"""Direct tests of the Triton launchers of ``linear_logprobs`` (``triton_fwd.forward``,
``triton_bwd.backward``) against a float64 full-logits autograd reference.

Every kernel test takes the ``device`` fixture: ``cpu`` (marked ``interpret``: CPU tensors under
``TRITON_INTERPRET=1``, small shapes, the interpreter is slow) and ``cuda`` (marked ``gpu``: the compiled
kernels). ``tests/conftest.py`` skips the first where Triton compiles and the second without CUDA, so one
process runs one of the two. On CUDA the kernels run with ``PREFUSE_AUTOTUNE=off`` unless set otherwise (one
fixed config per kernel variant: no autotuning benchmarks per test shape); the autotuner and the tuned-table
paths have tests of their own."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the kernel imports: triton.jit picks its mode at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json

import triton
from prefuse.kernels.linear_logprobs import triton_bwd, triton_configs, triton_fwd


@pytest.fixture(
    params=[
        pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
        pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
    ]
)
def device(request, monkeypatch):
    """The device of a kernel test (see the module docstring)."""
    if request.param == "cuda":
        monkeypatch.setenv("PREFUSE_AUTOTUNE", os.environ.get("PREFUSE_AUTOTUNE") or "off")
    return request.param


# (values, grads) tolerances on max|error| / max|reference|; the reference sees the same rounded inputs, so
# values stay near fp32 accuracy; grads carry the 16-bit rounding of the dl operand and of the output.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-5, 3e-3),
    torch.bfloat16: (2e-5, 2e-2),
}


def make_inputs(
    device, *, M=20, N=13, V=67, D=19, n_valid=10, dtype=torch.float32, bias=True, scale=1.0, seed=0
):
    """Hidden rows as a strided view (row stride 2*(D+3)) scored through a permutation (rows not 0..N-1, some
    hidden rows never referenced); ignored rows after ``n_valid`` with target -100."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(2 * M, D + 3, generator=g)
    hidden2d = storage[::2, :D].to(dtype=dtype, device=device)
    weight = (torch.randn(V, D, generator=g) * scale / D**0.5).to(dtype=dtype, device=device)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype=dtype, device=device) if bias else None
    rows = torch.randperm(M, generator=g)[:N].to(device)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[n_valid:] = -100
    grad = torch.randn(N, generator=g).to(device)
    grad[n_valid:] = float("nan")  # never to be read
    return dict(
        hidden2d=hidden2d,
        weight=weight,
        bias=b,
        rows=rows,
        targets=targets,
        n_valid=torch.tensor([n_valid], device=device),
    ), grad


def reference(inputs, grad, softcap, inv_temperature):
    """float64 full logits + autograd: (logp, lse, grad_hidden2d, grad_weight, grad_bias)."""
    n = int(inputs["n_valid"])
    h = inputs["hidden2d"].double().requires_grad_()
    w = inputs["weight"].double().requires_grad_()
    b = inputs["bias"].double().requires_grad_() if inputs["bias"] is not None else None
    logits = h[inputs["rows"][:n]] @ w.T + (b if b is not None else 0.0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    z = logits * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, inputs["targets"][:n, None])[:, 0] - lse
    (logp * grad[:n].double()).sum().backward()
    pad = torch.zeros(len(inputs["rows"]) - n, dtype=torch.float64, device=h.device)
    return (
        torch.cat([logp.detach(), pad]),
        torch.cat([lse.detach(), pad]),
        h.grad,
        w.grad,
        None if b is None else b.grad,
    )


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run(inputs, grad, *, softcap=None, inv_temperature=1.0, need=(True, True, True), deterministic=False):
    logp, lse = triton_fwd.forward(**inputs, softcap=softcap, inv_temperature=inv_temperature)
    grads = triton_bwd.backward(
        **inputs,
        lse=lse,
        grad=grad,
        softcap=softcap,
        inv_temperature=inv_temperature,
        need_hidden=need[0],
        need_weight=need[1],
        need_bias=need[2],
        deterministic=deterministic,
    )
    return (logp, lse, *grads)


def check(inputs, grad, dtype=torch.float32, *, softcap=None, inv_temperature=1.0, deterministic=False):
    out = run(inputs, grad, softcap=softcap, inv_temperature=inv_temperature, deterministic=deterministic)
    ref = reference(inputs, grad, softcap, inv_temperature)
    value_tol, grad_tol = TOLERANCES[dtype]
    for name, a, r, tol in zip(
        ("logp", "lse", "grad_hidden", "grad_weight", "grad_bias"),
        out,
        ref,
        (value_tol, value_tol, grad_tol, grad_tol, grad_tol),
    ):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == (torch.float32 if name in ("logp", "lse") else dtype), name
        assert a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        if r.abs().max() > 0:
            assert rel_err(a, r) <= tol, (name, rel_err(a, r))
        else:
            assert (a == 0).all(), name
    n = int(inputs["n_valid"])
    assert (out[0][n:] == 0).all() and (out[1][n:] == 0).all()
    untouched = torch.ones(inputs["hidden2d"].shape[0], dtype=torch.bool, device=out[2].device)
    untouched[inputs["rows"][:n]] = False
    assert (out[2][untouched] == 0).all()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap, inv_temperature, bias", [(None, 1.0, False), (4.0, 1 / 0.7, True)])
def test_matches_float64_reference(device, dtype, softcap, inv_temperature, bias):
    inputs, grad = make_inputs(device, dtype=dtype, bias=bias, scale=3.0)
    check(inputs, grad, dtype, softcap=softcap, inv_temperature=inv_temperature)


@pytest.mark.parametrize(
    "shape", [dict(M=9, N=7, V=30, D=40, n_valid=7), dict(M=50, N=37, V=100, D=5, n_valid=30)]
)
def test_odd_shapes_and_one_or_many_vocab_splits(device, shape):
    """Under the interpreter V=30 fits one vocab split (owned grad_hidden rows), V=100 needs several (atomic
    grad_hidden); on CUDA see ``test_many_vocab_splits_and_odd_hidden_size``."""
    inputs, grad = make_inputs(device, **shape)
    if device == "cpu":
        splits, _ = triton_configs.vocab_splits(
            shape["N"], shape["V"], torch.device(device), interpreted=True
        )
        assert (splits == 1) == (shape["V"] <= 30)
    check(inputs, grad, softcap=2.0, inv_temperature=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_many_vocab_splits_and_odd_hidden_size(monkeypatch, dtype, deterministic):
    """Compiled kernels at a shape with several CUDA vocab splits (atomic grad_hidden), a hidden size that no
    BLOCK_D divides, row blocks wholly and partly past n_valid, softcap, bias and temperature."""
    monkeypatch.setenv("PREFUSE_AUTOTUNE", os.environ.get("PREFUSE_AUTOTUNE") or "off")
    shape = dict(M=300, N=257, V=1000, D=136, n_valid=150)
    splits, _ = triton_configs.vocab_splits(shape["N"], shape["V"], torch.device("cuda"), interpreted=False)
    assert splits > 1
    inputs, grad = make_inputs("cuda", dtype=dtype, scale=3.0, **shape)
    check(inputs, grad, dtype, softcap=30.0, inv_temperature=1 / 0.9, deterministic=deterministic)


@pytest.mark.parametrize("n_valid", [0, 13])
def test_no_and_all_rows_valid(device, n_valid):
    inputs, grad = make_inputs(device, n_valid=n_valid)
    out = check(inputs, grad)
    if n_valid == 0:
        assert all((t == 0).all() for t in out)


def test_huge_logits_stay_finite(device):
    inputs, grad = make_inputs(device, scale=1e4 / 3)  # logits of magnitude ~1e4
    logp, *_ = check(inputs, grad, softcap=None)
    assert logp[:10].abs().max() > 1e3


def test_ignored_entries_are_written_and_never_read(device, monkeypatch):
    """Every partial the forward kernel owns is written (buffers poisoned with NaN), ignored rows are exactly
    0.0 in both outputs, and NaN in lse/grad past n_valid does not leak into the gradients."""
    buffers = []

    def poisoned(shape, device):
        buffers.append(torch.full(shape, float("nan"), device=device))
        return buffers[-1]

    monkeypatch.setattr(triton_fwd, "_empty", poisoned)
    inputs, grad = make_inputs(device, N=40, M=45, n_valid=21)  # row blocks wholly past n_valid, too
    logp, lse = triton_fwd.forward(**inputs, softcap=3.0, inv_temperature=1.0)
    assert len(buffers) == 2 and all(torch.isfinite(b).all() and (b[21:] == 0).all() for b in buffers)
    assert buffers[0].shape[1] > 1 or device == "cuda"  # several vocab splits under the interpreter
    assert (logp[21:] == 0).all() and (lse[21:] == 0).all() and torch.isfinite(logp).all()
    lse[21:] = float("nan")
    ref = reference(inputs, grad, 3.0, 1.0)
    grads = triton_bwd.backward(
        **inputs,
        lse=lse,
        grad=grad,
        softcap=3.0,
        inv_temperature=1.0,
        need_hidden=True,
        need_weight=True,
        need_bias=True,
        deterministic=False,
    )
    for a, r in zip(grads, ref[2:]):
        assert rel_err(a, r) <= 1e-4


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel name, constexpr flags) of every launch."""
    seen = []
    original = triton_configs.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append((triton_configs.kernel_name(kernel), kwargs))
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_configs, "launch", record)
    return seen


@pytest.mark.parametrize("deterministic", [False, True])
def test_frozen_weight_costs_no_weight_gradient(device, launches, deterministic):
    inputs, grad = make_inputs(device)
    out = run(inputs, grad, need=(True, False, True), deterministic=deterministic)
    ref = reference(inputs, grad, None, 1.0)
    assert out[3] is None
    assert rel_err(out[2], ref[2]) <= 1e-4 and rel_err(out[4], ref[4]) <= 1e-4
    backward_launches = [kw for name, kw in launches if name != "_forward_kernel"]
    assert backward_launches and not any(kw["NEED_W"] for kw in backward_launches)


def test_expanded_upstream_gradient(device):
    """A stride-0 gradient, as ``logp.sum().backward()`` produces, reads like its contiguous copy."""
    inputs, _ = make_inputs(device, n_valid=13)
    ones = torch.ones(1, device=device)
    expanded = run(inputs, ones.expand(13))
    contiguous = run(inputs, ones.expand(13).contiguous())
    assert all(torch.equal(a, b) for a, b in zip(expanded, contiguous))


def test_only_weight_gradient(device, launches):
    inputs, grad = make_inputs(device, bias=False)
    out = run(inputs, grad, need=(False, True, True), deterministic=True)
    ref = reference(inputs, grad, None, 1.0)
    assert out[2] is None and out[4] is None  # no bias: no bias gradient
    assert rel_err(out[3], ref[3]) <= 1e-4
    assert [name for name, _ in launches] == ["_forward_kernel", "_weight_kernel"]
    assert launches[1][1]["NEED_B"] is False


def test_deterministic_is_bit_identical_and_matches_atomic(device):
    inputs, grad = make_inputs(device, N=40, M=45, V=100, n_valid=35)
    first = check(inputs, grad, softcap=5.0, inv_temperature=1.3, deterministic=True)
    second = run(inputs, grad, softcap=5.0, inv_temperature=1.3, deterministic=True)
    atomic = run(inputs, grad, softcap=5.0, inv_temperature=1.3, deterministic=False)
    for a, b, c in zip(first[2:], second[2:], atomic[2:]):
        assert torch.equal(a, b)
        assert rel_err(a, c) <= 1e-5


def test_vocab_splits_tile_the_vocab(device):
    interpreted = device == "cpu"
    block_v = (
        triton_configs.INTERPRET_META["BLOCK_V"] if interpreted else max(triton_configs.GPU_SPACE["BLOCK_V"])
    )
    for n_tokens in (1, 13, 4096):
        for vocab in (1, 31, 67, 128_256):
            splits, split_v = triton_configs.vocab_splits(n_tokens, vocab, torch.device(device), interpreted)
            assert split_v % block_v == 0 and (splits - 1) * split_v < vocab <= splits * split_v


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_configs, "is_interpreted", lambda kernel: False)
    inputs, _ = make_inputs("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_fwd.forward(**inputs, softcap=None, inv_temperature=1.0)


def _small_configs(*metas):
    return [
        triton.Config({k: m[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}, num_warps=m["num_warps"],
                      num_stages=m["num_stages"])
        for m in metas
    ]  # fmt: skip


@pytest.mark.gpu
def test_autotuner_path_resets_accumulators(monkeypatch, launches):
    """With ``PREFUSE_AUTOTUNE=force`` the autotuner benchmarks every config (each benchmark run adds into
    the atomic gradient buffers) and must zero them before the real run: the result still matches."""
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "force")
    configs = _small_configs(
        {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    )
    for kernel in (triton_fwd._forward_kernel, triton_bwd._backward_kernel, triton_bwd._weight_kernel):
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
    inputs, grad = make_inputs("cuda", M=300, N=257, V=1000, D=136, n_valid=200)
    for deterministic in (False, True):
        with triton_configs.recording() as records:
            check(inputs, grad, softcap=3.0, deterministic=deterministic)
        assert records and all(r.source == "autotune" for r in records)
    assert {name for name, _ in launches} == {"_forward_kernel", "_backward_kernel", "_weight_kernel"}


@pytest.mark.gpu
def test_tuned_table_config_is_launched(monkeypatch, tmp_path):
    """A table entry for this device and shape is launched directly with its config (no autotuning)."""
    inputs, grad = make_inputs("cuda", dtype=torch.bfloat16, n_valid=13)
    name, capability = triton_configs.device_signature(torch.cuda.current_device())
    config = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
    entries = [
        {"device": name, "capability": capability, "kernel": kernel, "dtype": "bfloat16", "config": config,
         "key": {"D": 19, "V": 67, "N_BUCKET": 16, "HAS_SOFTCAP": False, **flags}}
        for kernel, flags in (
            ("_forward_kernel", {}),
            ("_backward_kernel", {"NEED_H": True, "NEED_W": True, "NEED_B": True, "ATOMIC_H": False}),
        )
    ]  # fmt: skip
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 1, "entries": entries}))
    monkeypatch.setenv("PREFUSE_TUNED_CONFIGS", str(path))
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "auto")  # an untabled launch would autotune: none may happen
    with triton_configs.recording() as records:
        check(inputs, grad, torch.bfloat16)
    assert [(r.kernel, r.source, r.config) for r in records] == [
        ("_forward_kernel", "table", config),
        ("_backward_kernel", "table", config),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_config_space_prunes_to_fitting_configs(monkeypatch, dtype):
    """The CUDA config space, pruned for an H100 (227 KiB of shared memory per block), keeps configs for
    every kernel, each fitting shared memory and its register budget."""
    monkeypatch.setattr(triton_configs, "_shared_memory_bytes", lambda index: 232_448)
    weight = torch.empty(8, 8, dtype=dtype)
    configs = triton_configs._gpu_configs()
    assert len(configs) == 2 * 3 * 3 * 2 * 3
    for budget in (triton_configs.FORWARD_TILE_PER_THREAD, triton_configs.BACKWARD_TILE_PER_THREAD):
        kept = triton_configs._prune(configs, {"weight_ptr": weight}, tile_per_thread=budget)
        assert kept
        for c in kept:
            n, v, d = (c.kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
            assert c.num_stages * (n + v) * d * weight.element_size() + n * v * 4 <= 232_448
            assert n * v <= budget * 32 * c.num_warps
