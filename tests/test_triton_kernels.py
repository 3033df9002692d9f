"""Direct tests of the Triton launchers of ``linear_logprobs`` (``triton_fwd.forward``,
``triton_bwd.backward``) against a float64 full-logits autograd reference: values, statistics and every
gradient, including the entropy's.

Every kernel test takes the ``device`` fixture: ``cpu`` (marked ``interpret``: CPU tensors under
``TRITON_INTERPRET=1``, small shapes, the interpreter is slow) and ``cuda`` (marked ``gpu``: the compiled
kernels with their default configs). ``tests/conftest.py`` skips the first where Triton compiles and the second
without CUDA, so one process runs one of the two."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the kernel imports: triton.jit picks its mode at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
        monkeypatch.delenv("PREFUSE_AUTOTUNE", raising=False)
    return request.param


# (values, grads) tolerances on max|error| / max|reference|; the reference sees the same rounded inputs, so
# values stay near fp32 accuracy; grads carry the 16-bit rounding of the dl operand and of the output.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-5, 3e-3),
    torch.bfloat16: (2e-5, 2e-2),
}
OPTIONS = dict(softcap=None, inv_temperature=1.0, logit_scale=1.0)


def make_inputs(
    device, *, M=20, N=13, V=67, D=19, n_valid=10, dtype=torch.float32, bias=True, scale=1.0, seed=0
):
    """Hidden rows as a strided view (row stride 2*(D+3)) scored through a permutation (rows not 0..N-1, some
    hidden rows never referenced); ignored rows after ``n_valid`` with target -100. Also the upstream
    gradients of logp and of the entropy, NaN past ``n_valid`` (never to be read)."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(2 * M, D + 3, generator=g)
    hidden2d = storage[::2, :D].to(dtype=dtype, device=device)
    weight = (torch.randn(V, D, generator=g) * scale / D**0.5).to(dtype=dtype, device=device)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype=dtype, device=device) if bias else None
    rows = torch.randperm(M, generator=g)[:N].to(device)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[n_valid:] = -100
    grads = torch.randn(2, N, generator=g).to(device)
    grads[:, n_valid:] = float("nan")
    inputs = dict(hidden2d=hidden2d, weight=weight, bias=b, rows=rows, targets=targets,
                  n_valid=torch.tensor([n_valid], device=device))  # fmt: skip
    return inputs, grads[0], grads[1]


def reference(inputs, grad, grad_entropy=None, *, softcap, inv_temperature, logit_scale):
    """float64 full logits + autograd: dict of logp, lse, the four statistics and the three gradients of
    ``sum(grad * logp + grad_entropy * entropy)`` (all rows past n_valid 0)."""
    n = int(inputs["n_valid"])
    h = inputs["hidden2d"].double().requires_grad_()
    w = inputs["weight"].double().requires_grad_()
    b = inputs["bias"].double().requires_grad_() if inputs["bias"] is not None else None
    x = logit_scale * (h[inputs["rows"][:n]] @ w.T + (b if b is not None else 0.0))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    z = x * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    t = inputs["targets"][:n]
    logp = z.gather(1, t[:, None])[:, 0] - lse
    log_p = z - lse[:, None]
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = (logp * grad[:n].double()).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy[:n].double()).sum()
    loss.backward()

    def pad(values):
        out = torch.zeros(len(inputs["rows"]), dtype=torch.float64, device=h.device)
        out[:n] = values.detach()
        return out

    return {
        "logp": pad(logp),
        "lse": pad(lse),
        "entropy": pad(entropy),
        "log_sum_sq_probs": pad(torch.logsumexp(2 * log_p, dim=-1)),
        "mean_logits": pad(z.mean(-1)),
        "is_top1": pad((z.argmax(-1) == t).double()),
        "grad_hidden": h.grad,
        "grad_weight": w.grad,
        "grad_bias": None if b is None else b.grad,
    }


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run(inputs, grad, grad_entropy=None, *, need=(True, True, True), deterministic=False, with_stats=False,
        **options):  # fmt: skip
    """Forward and backward through the launchers: dict of logp, lse, stats and the three gradients."""
    options = {**OPTIONS, **options}
    logp, lse, stats = triton_fwd.forward(
        **inputs, **options, with_stats=with_stats or grad_entropy is not None
    )
    entropy = stats[:, 0] if grad_entropy is not None else None
    grads = triton_bwd.backward(
        **inputs,
        lse=lse,
        entropy=entropy,
        grad_logp=grad,
        grad_entropy=grad_entropy,
        **options,
        need_hidden=need[0],
        need_weight=need[1],
        need_bias=need[2],
        deterministic=deterministic,
        filter_eps=None,
    )
    return dict(
        logp=logp, lse=lse, stats=stats, **dict(zip(("grad_hidden", "grad_weight", "grad_bias"), grads))
    )


def check(inputs, grad, grad_entropy=None, dtype=torch.float32, *, deterministic=False, with_stats=False,
          **options):  # fmt: skip
    """Run and compare every output with :func:`reference`; returns the outputs."""
    options = {**OPTIONS, **options}
    out = run(inputs, grad, grad_entropy, deterministic=deterministic, with_stats=with_stats, **options)
    ref = reference(inputs, grad, grad_entropy, **options)
    value_tol, grad_tol = TOLERANCES[dtype]
    n = int(inputs["n_valid"])
    assert out["stats"].shape == (
        (len(inputs["rows"]), 4) if with_stats or grad_entropy is not None else (0,)
    )
    for name, a in out.items():
        if name == "stats":
            continue
        r = ref[name]
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == (torch.float32 if name in ("logp", "lse") else dtype), name
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        tol = value_tol if name in ("logp", "lse") else grad_tol
        if r.abs().max() > 0:
            assert rel_err(a, r) <= tol, (name, rel_err(a, r))
        else:
            assert (a == 0).all(), name
    for column, name in enumerate(triton_fwd.STATS):
        if out["stats"].numel():
            a = out["stats"][:, column]
            assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
            if name == "is_top1":
                assert torch.equal(a, ref[name].float()), name
            else:  # absolute error relative to the logit scale: entropies near 0 have no relative accuracy
                scale = ref["lse"][:n].abs().max().clamp_min(1.0) if n else 1.0
                assert (a.double() - ref[name]).abs().max() <= value_tol * scale, (name, a, ref[name])
            assert (a[n:] == 0).all(), name
    assert (out["logp"][n:] == 0).all() and (out["lse"][n:] == 0).all()
    untouched = torch.ones(inputs["hidden2d"].shape[0], dtype=torch.bool, device=inputs["rows"].device)
    untouched[inputs["rows"][:n]] = False
    if out["grad_hidden"] is not None:
        assert (out["grad_hidden"][untouched] == 0).all()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "options, bias",
    [
        (dict(), False),
        (dict(softcap=4.0, inv_temperature=1 / 0.7, logit_scale=0.6), True),
    ],
)
def test_matches_float64_reference(device, dtype, options, bias):
    inputs, grad, grad_entropy = make_inputs(device, dtype=dtype, bias=bias, scale=3.0)
    check(inputs, grad, grad_entropy, dtype, **options)


@pytest.mark.parametrize("deterministic", [False, True])
def test_statistics_and_entropy_gradient(device, deterministic):
    """All four statistics across several vocab splits, and the entropy gradient in both backward modes;
    a duplicated column makes the target's logit tie with an earlier column (not the first argmax)."""
    inputs, grad, grad_entropy = make_inputs(device, M=45, N=40, V=100, D=16, n_valid=33, scale=4.0)
    weight, targets = inputs["weight"], inputs["targets"]
    weight[70] = weight[5]  # columns 5 and 70 tie everywhere; a row whose argmax is 70 has first argmax 5
    targets[0] = 70
    out = check(inputs, grad, grad_entropy, softcap=6.0, inv_temperature=1.5, logit_scale=1.7,
                deterministic=deterministic)  # fmt: skip
    top1 = out["stats"][:33, 3]
    assert 0 < top1.sum() < 33  # the check above compared it with the reference's first argmax


def test_statistics_without_entropy_gradient(device):
    inputs, grad, _ = make_inputs(device, n_valid=13)
    out = check(inputs, grad, with_stats=True, logit_scale=2.0)
    fwd_only = triton_fwd.forward(**inputs, **{**OPTIONS, "logit_scale": 2.0}, with_stats=False)
    assert torch.equal(out["logp"], fwd_only[0]) and fwd_only[2].shape == (0,)


@pytest.mark.parametrize("softcap", [1e4, 1e8])
def test_softcap_is_accurate_for_small_arguments(device, softcap):
    """``tanh(x / c)`` for ``|x| << c``: a softcap far above the logits leaves them (nearly) unchanged; the
    former ``(1 - e) / (1 + e)`` lost ``c * 6e-8`` of absolute accuracy there (2.1 at c = 1e8)."""
    inputs, grad, grad_entropy = make_inputs(device, scale=3.0)
    check(inputs, grad, grad_entropy, softcap=softcap, with_stats=True)
    plain = run(inputs, grad, **{**OPTIONS, "softcap": None})
    capped = run(inputs, grad, **{**OPTIONS, "softcap": softcap})
    assert rel_err(capped["logp"], plain["logp"].double()) <= 1e-5


@pytest.mark.parametrize(
    "shape", [dict(M=9, N=7, V=30, D=40, n_valid=7), dict(M=50, N=37, V=100, D=5, n_valid=30)]
)
def test_odd_shapes_and_one_or_many_vocab_splits(device, shape):
    """Under the interpreter V=30 fits one vocab split, V=100 needs several (partial combine, atomic
    grad_hidden); on CUDA see ``test_many_vocab_splits_and_odd_hidden_size``."""
    inputs, grad, grad_entropy = make_inputs(device, **shape)
    if device == "cpu":
        splits, _ = triton_configs.vocab_splits(
            shape["N"], shape["V"], torch.device(device), interpreted=True
        )
        assert (splits == 1) == (shape["V"] <= 30)
    check(inputs, grad, grad_entropy, softcap=2.0, inv_temperature=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_many_vocab_splits_and_odd_hidden_size(monkeypatch, dtype, deterministic):
    """Compiled kernels (default configs) at a shape with several CUDA vocab splits, a hidden size that no
    BLOCK_D divides, row blocks wholly and partly past n_valid, softcap, bias, temperature and statistics."""
    monkeypatch.delenv("PREFUSE_AUTOTUNE", raising=False)
    shape = dict(M=300, N=257, V=1000, D=136, n_valid=150)
    splits, _ = triton_configs.vocab_splits(shape["N"], shape["V"], torch.device("cuda"), interpreted=False)
    assert splits > 1
    inputs, grad, grad_entropy = make_inputs("cuda", dtype=dtype, scale=3.0, **shape)
    check(inputs, grad, grad_entropy, dtype, softcap=30.0, inv_temperature=1 / 0.9, logit_scale=0.8,
          deterministic=deterministic)  # fmt: skip


@pytest.mark.parametrize("n_valid", [0, 13])
def test_no_and_all_rows_valid(device, n_valid):
    inputs, grad, grad_entropy = make_inputs(device, n_valid=n_valid)
    out = check(inputs, grad, grad_entropy if n_valid else None, with_stats=True)
    if n_valid == 0:
        assert all((t == 0).all() for t in out.values())


def test_huge_logits_stay_finite(device):
    inputs, grad, grad_entropy = make_inputs(device, scale=1e4 / 3)  # logits of magnitude ~1e4
    out = check(inputs, grad, grad_entropy)
    assert out["logp"][:10].abs().max() > 1e3


def test_ignored_entries_are_written_and_never_read(device, monkeypatch):
    """Every partial the forward kernel owns is written (buffer poisoned with NaN), ignored rows are exactly
    0.0 in every output, and NaN in lse/entropy/grads past n_valid does not leak into the gradients."""
    buffers = []

    def poisoned(shape, device):
        buffers.append(torch.full(shape, float("nan"), device=device))
        return buffers[-1]

    monkeypatch.setattr(triton_fwd, "_empty", poisoned)
    inputs, grad, grad_entropy = make_inputs(device, N=40, M=45, n_valid=21)  # row blocks wholly past n_valid
    options = {**OPTIONS, "softcap": 3.0}
    logp, lse, stats = triton_fwd.forward(**inputs, **options, with_stats=True)
    (part,) = buffers
    assert torch.isfinite(part).all() and (part[21:] == 0).all()
    assert part.shape[1] > 1 or device == "cuda"  # several vocab splits under the interpreter
    assert all((t[21:] == 0).all() and torch.isfinite(t).all() for t in (logp, lse, stats))
    lse[21:] = float("nan")
    entropy = stats[:, 0].clone()
    entropy[21:] = float("nan")
    ref = reference(inputs, grad, grad_entropy, **options)
    grads = triton_bwd.backward(**inputs, lse=lse, entropy=entropy, grad_logp=grad, grad_entropy=grad_entropy,
                                **options, need_hidden=True, need_weight=True, need_bias=True,
                                deterministic=False, filter_eps=None)  # fmt: skip
    for a, name in zip(grads, ("grad_hidden", "grad_weight", "grad_bias")):
        assert rel_err(a, ref[name]) <= 1e-4


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel name, keyword arguments) of every launch."""
    seen = []
    original = triton_configs.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append((triton_configs.kernel_name(kernel), kwargs))
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_configs, "launch", record)
    return seen


@pytest.mark.parametrize("deterministic", [False, True])
def test_frozen_weight_costs_no_weight_gradient(device, launches, deterministic):
    inputs, grad, _ = make_inputs(device)
    out = run(inputs, grad, need=(True, False, True), deterministic=deterministic)
    ref = reference(inputs, grad, **OPTIONS)
    assert out["grad_weight"] is None
    assert rel_err(out["grad_hidden"], ref["grad_hidden"]) <= 1e-4
    assert rel_err(out["grad_bias"], ref["grad_bias"]) <= 1e-4
    backward_launches = [kw for name, kw in launches if name != "_forward_kernel"]
    assert backward_launches and not any(kw["NEED_W"] for kw in backward_launches)


def test_expanded_upstream_gradient(device):
    """A stride-0 gradient, as ``logp.sum().backward()`` produces, reads like its contiguous copy."""
    inputs, _, _ = make_inputs(device, n_valid=13)
    ones = torch.ones(1, device=device)
    expanded = run(inputs, ones.expand(13), ones.expand(13))
    contiguous = run(inputs, ones.expand(13).contiguous(), ones.expand(13).contiguous())
    assert all(torch.equal(expanded[k], contiguous[k]) for k in expanded)


def test_only_weight_gradient(device, launches):
    inputs, grad, _ = make_inputs(device, bias=False)
    out = run(inputs, grad, need=(False, True, True), deterministic=True)
    ref = reference(inputs, grad, **OPTIONS)
    assert out["grad_hidden"] is None and out["grad_bias"] is None  # no bias: no bias gradient
    assert rel_err(out["grad_weight"], ref["grad_weight"]) <= 1e-4
    assert [name for name, _ in launches] == ["_forward_kernel", "_weight_kernel"]
    assert launches[1][1]["NEED_B"] is False


def test_deterministic_is_bit_identical_and_matches_atomic(device):
    inputs, grad, grad_entropy = make_inputs(device, N=40, M=45, V=100, n_valid=35)
    options = dict(softcap=5.0, inv_temperature=1.3, logit_scale=1.1)
    first = check(inputs, grad, grad_entropy, deterministic=True, **options)
    second = run(inputs, grad, grad_entropy, deterministic=True, **options)
    atomic = run(inputs, grad, grad_entropy, deterministic=False, **options)
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        assert torch.equal(first[name], second[name])
        assert rel_err(first[name], atomic[name]) <= 1e-5


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
    inputs, _, _ = make_inputs("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_fwd.forward(**inputs, **OPTIONS, with_stats=False)


def test_bad_backward_options_raise():
    inputs, grad, grad_entropy = make_inputs("cpu")
    lse = torch.zeros(13)
    base = dict(**inputs, lse=lse, grad_logp=grad, **OPTIONS, need_hidden=True, need_weight=True,
                need_bias=True, deterministic=False)  # fmt: skip
    with pytest.raises(ValueError, match="filter_eps"):
        triton_bwd.backward(**base, entropy=None, grad_entropy=None, filter_eps=1e-6)
    with pytest.raises(ValueError, match="entropy"):
        triton_bwd.backward(**base, entropy=None, grad_entropy=grad_entropy, filter_eps=None)


@pytest.mark.parametrize("bias, need", [(False, (True, True, True)), (True, (True, False, False)),
                                        (True, (False, True, False))])  # fmt: skip
@pytest.mark.parametrize("deterministic", [False, True])
def test_reset_buffers_are_never_none(device, monkeypatch, bias, need, deterministic):
    """Triton 3.6's autotuner zeroes every ``reset_to_zero`` argument without a ``None`` check: a gradient
    buffer that is not asked for (no bias, frozen head, hidden-only) must still be a tensor, and is never
    written. Each launch here first does what 3.6's reset hook does, then launches."""
    original = triton_configs.launch

    def reset_then_launch(kernel, grid, *args, **kwargs):
        bound = {**dict(zip(triton_configs.jit_function(kernel).arg_names, args)), **kwargs}
        for name in triton_configs.KERNELS[triton_configs.kernel_name(kernel)].reset_to_zero:
            bound[name].zero_()  # Triton 3.6: `kwargs[name].zero_()`
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_configs, "launch", reset_then_launch)
    inputs, grad, _ = make_inputs(device, bias=bias)
    out = run(inputs, grad, need=need, deterministic=deterministic)
    ref = reference(inputs, grad, **OPTIONS)
    for flag, name in zip(need, ("grad_hidden", "grad_weight", "grad_bias")):
        if flag and ref[name] is not None:
            assert rel_err(out[name], ref[name]) <= 1e-4
        else:
            assert out[name] is None


def test_launch_refuses_a_none_reset_buffer():
    inputs, grad, _ = make_inputs("cpu")
    with pytest.raises(ValueError, match="grad_b_ptr"):
        triton_configs.launch(triton_bwd._weight_kernel, (1,), *inputs.values(), grad, grad, grad, grad,
                              torch.zeros(67, 19), None)  # fmt: skip


def test_autotune_key_and_resets():
    """The autotuner keys on everything that changes the compiled code or the best config: shape bucket,
    flags, the dot precision (TF32 vs 3xTF32 for fp32) and the bias flag; it resets every atomic target."""
    for kernel in (triton_fwd._forward_kernel, triton_bwd._backward_kernel, triton_bwd._weight_kernel):
        spec = triton_configs.KERNELS[triton_configs.kernel_name(kernel)]
        tuner = triton_configs.autotuner(triton_configs.jit_function(kernel), spec)
        assert {"D", "V", "N_BUCKET", "HAS_SOFTCAP", "HAS_BIAS", "DOT_PRECISION"} <= set(tuner.keys)
        assert list(tuner.reset_to_zero) == list(spec.reset_to_zero)
        constexprs = {name for name in tuner.arg_names if name.isupper() and not name.startswith("BLOCK_")}
        assert constexprs - {"UPCAST_DOT", "N", "V", "D", "SPLIT_V", "N_BUCKET"} <= set(tuner.keys)
    assert set(triton_configs.KERNELS["_backward_kernel"].reset_to_zero) == {"grad_h_ptr", "grad_w_ptr",
                                                                            "grad_b_ptr"}  # fmt: skip


def test_autotune_switch(monkeypatch):
    for value, enabled in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv("PREFUSE_AUTOTUNE", value)
        assert triton_configs.autotune_enabled() is enabled
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "auto")
    with pytest.raises(ValueError, match="PREFUSE_AUTOTUNE"):
        triton_configs.autotune_enabled()


@pytest.mark.gpu
def test_autotuner_path_resets_accumulators(monkeypatch):
    """With ``PREFUSE_AUTOTUNE=1`` the autotuner benchmarks several configs (each benchmark run adds into the
    atomic gradient buffers) and must zero them before the real run: the result still matches."""
    import triton

    monkeypatch.setenv("PREFUSE_AUTOTUNE", "1")
    configs = [
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    ]
    for kernel in (triton_fwd._forward_kernel, triton_bwd._backward_kernel, triton_bwd._weight_kernel):
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
    inputs, grad, grad_entropy = make_inputs("cuda", M=300, N=257, V=1000, D=136, n_valid=200, bias=False)
    for deterministic in (False, True):
        check(inputs, grad, grad_entropy, softcap=3.0, deterministic=deterministic)
        assert all(len(k.cache) for k in (triton_fwd._forward_kernel, triton_bwd._backward_kernel))
