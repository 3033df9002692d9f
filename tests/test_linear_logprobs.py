"""``prefuse.kernels.linear_logprobs`` against a naive float64 reference (full logits, autograd).

Every implementation (PyTorch twin on CPU, Triton under the interpreter, both on CUDA when present) is held
to the same reference: values and the gradients of hidden, weight and bias.
"""

import math

import pytest
import torch
from prefuse.kernels import linear_logprobs
from prefuse.kernels.linear_logprobs import naive_linear_logprobs, op
from reference import OP_IMPLS as IMPLS
from reference import grad_tol, rel_err
from reference import op_reference as reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "shift": {"shift": True},
    "bias": {"bias": True},
    "softcap-temperature": {"softcap": 3.0, "temperature": 0.7},
    "everything": {"shift": True, "bias": True, "softcap": 2.5, "temperature": 1.3},
    "ignore-index-7": {"ignore_index": 7},
}


def make_inputs(shape=(2, 9), dim=19, vocab=67, dtype=torch.float32, device="cpu", bias=False, scale=1.0,
                ignore_index=-100, seed=0):  # fmt: skip
    """Random head inputs; the first third of every row is ignored (a prompt), plus one all-ignored row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, dim, generator=gen) * scale).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim)).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    if ignore_index != -100:  # make sure the custom id also occurs as a real target elsewhere
        targets[targets == ignore_index] = (ignore_index + 1) % vocab
    targets[..., : shape[-1] // 3] = ignore_index
    if len(shape) > 1 and shape[0] > 1:
        targets[-1] = ignore_index

    def move(x):
        return None if x is None else x.to(device)

    return move(hidden), move(weight), move(targets), move(b)


def fused(impl, hidden, weight, targets, bias, grad_out, **opts):
    backend, _ = impl
    leaves = [
        x.detach().clone().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    out = linear_logprobs(
        leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, backend=backend, **opts
    )
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)
    return out, grads


def check_against_reference(impl, hidden, weight, targets, bias, dtype, **opts):
    n_out = naive_linear_logprobs(hidden.double(), weight.double(), targets, None, **opts).shape
    grad_out = torch.randn(n_out, generator=torch.Generator().manual_seed(1)).to(hidden.device)
    out, grads = fused(impl, hidden, weight, targets, bias, grad_out, **opts)
    ref, ref_grads = reference(hidden, weight, targets, bias, grad_out, **opts)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    ignore_index = opts.get("ignore_index", -100)
    ignored = (targets[..., 1:] if opts.get("shift") else targets) == ignore_index
    assert (out[ignored] == 0.0).all(), "ignored positions must be exactly 0.0"
    assert rel_err(out.cpu(), ref) <= 1e-5
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g.cpu(), rg) <= grad_tol(dtype), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIONS)
def test_matches_float64_reference(impl, dtype, name):
    opts = dict(OPTIONS[name])
    with_bias = opts.pop("bias", False)
    hidden, weight, targets, bias = make_inputs(
        dtype=dtype, device=impl[1], bias=with_bias, ignore_index=opts.get("ignore_index", -100)
    )
    check_against_reference(impl, hidden, weight, targets, bias, dtype, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_at_least_as_accurate_as_naive_in_that_precision(impl, dtype):
    """Against float64, the fused op in bf16/fp16 is within the error of the naive computation in that dtype.

    Values: fp32 logits make the fused op strictly better. Gradients: both round the logit gradient and the
    result to the dtype once, so they tie up to rounding luck (factor 1.5).
    """
    hidden, weight, targets, bias = make_inputs(shape=(3, 16), dim=48, vocab=300, dtype=dtype, device=impl[1],
                                                bias=True, scale=3.0)  # fmt: skip
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)).to(impl[1])
    out, grads = fused(impl, hidden, weight, targets, bias, grad_out)
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    naive = naive_linear_logprobs(leaves[0], leaves[1], targets, leaves[2])
    naive_grads = torch.autograd.grad((naive * grad_out).sum(), leaves)
    ref, ref_grads = reference(hidden, weight, targets, bias, grad_out)
    assert rel_err(out.cpu(), ref) <= rel_err(naive.cpu(), ref)
    for g, ng, rg in zip(grads, naive_grads, ref_grads):
        assert rel_err(g.cpu(), rg) <= 1.5 * rel_err(ng.cpu(), rg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape, dim, vocab, shift",
    [((1,), 5, 3, False), ((2,), 1, 2, True), ((3, 1, 5), 33, 129, False), ((13,), 17, 1, False)],
    ids=["single-token", "two-tokens-shift", "3d-odd", "vocab-1"],
)
def test_odd_shapes(impl, shape, dim, vocab, shift):
    hidden, weight, targets, bias = make_inputs(shape=shape, dim=dim, vocab=vocab, device=impl[1], bias=True)
    targets[..., -1] = 0  # at least one scored token
    check_against_reference(impl, hidden, weight, targets, bias, torch.float32, shift=shift)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_stay_finite(impl):
    """Logits of magnitude ~1e4: the online max keeps exp() in range; no inf or NaN anywhere."""
    hidden, weight, targets, bias = make_inputs(scale=2e3, device=impl[1], bias=True)
    check_against_reference(impl, hidden, weight, targets, bias, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    hidden, weight, targets, _ = make_inputs(device=impl[1])
    targets.fill_(-100)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, backend=impl[0])
    out.sum().backward()
    assert (out == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input(impl):
    hidden = torch.randn(0, 4, 8, device=impl[1], requires_grad=True)
    weight = torch.randn(11, 8, device=impl[1], requires_grad=True)
    out = linear_logprobs(hidden, weight, torch.zeros(0, 4, dtype=torch.long, device=impl[1]), shift=True,
                          backend=impl[0])  # fmt: skip
    assert out.shape == (0, 3)
    out.sum().backward()
    assert hidden.grad.shape == hidden.shape and (weight.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_computes_no_weight_gradient(impl, monkeypatch):
    """A frozen lm-head (LoRA, reference model): the backward is asked for no weight/bias gradient."""
    calls = []
    backward = op._backward_impl(impl[0])
    monkeypatch.setattr(
        op, "_backward_impl", lambda backend: lambda *a, **k: calls.append(k) or backward(*a, **k)
    )
    hidden, weight, targets, bias = make_inputs(device=impl[1], bias=True)
    hidden.requires_grad_()
    linear_logprobs(hidden, weight, targets, bias, backend=impl[0]).sum().backward()
    assert weight.grad is None and bias.grad is None and hidden.grad is not None
    assert [(c["need_hidden"], c["need_weight"], c["need_bias"]) for c in calls] == [(True, False, False)]


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_calls_do_not_leak_state(impl):
    first = make_inputs(device=impl[1], seed=3, bias=True)
    second = make_inputs(device=impl[1], seed=4, bias=True)
    grad = torch.ones(first[2].shape, device=impl[1])
    a1 = fused(impl, *first, grad)
    fused(impl, *second, grad)
    a2 = fused(impl, *first, grad)
    torch.testing.assert_close(a1[0], a2[0], rtol=0, atol=0)
    for g1, g2 in zip(a1[1], a2[1]):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_output_element_is_written(impl, monkeypatch):
    """Buffers from ``torch.empty`` are poisoned with NaN: any element an implementation forgets shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    hidden, weight, targets, bias = make_inputs(device=impl[1], bias=True)
    monkeypatch.setattr(torch, "empty", poisoned)
    grad_out = torch.ones(targets[..., 1:].shape, device=impl[1])
    out, grads = fused(impl, hidden, weight, targets, bias, grad_out, shift=True)
    assert not out.isnan().any()
    assert not any(g.isnan().any() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_and_int32_targets(impl):
    hidden, weight, targets, bias = make_inputs(shape=(9, 2), device=impl[1], bias=True)
    hidden_t, targets_t = hidden.transpose(0, 1), targets.transpose(0, 1)  # (2, 9, D) views, not contiguous
    assert not hidden_t.is_contiguous()
    grad = torch.randn(2, 9, device=impl[1])
    out, grads = fused(impl, hidden_t, weight, targets_t.int(), bias, grad)
    ref, ref_grads = reference(hidden_t, weight, targets_t, bias, grad)
    assert rel_err(out.cpu(), ref) <= 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g.cpu(), rg) <= 1e-4


def test_nan_hidden_propagates_to_its_own_position():
    """Documented choice: a non-finite hidden state gives NaN at the positions that read it, nothing else."""
    hidden, weight, targets, _ = make_inputs(shape=(6,))
    targets[:] = 1
    hidden[2, 0] = math.nan
    out = linear_logprobs(hidden, weight, targets)
    assert out[2].isnan() and torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


def test_torch_compile_traces_without_graph_break():
    hidden, weight, targets, bias = make_inputs(bias=True)

    def loss(h, w, b):
        return (linear_logprobs(h, w, targets, b, shift=True, softcap=5.0) ** 2).sum()

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    c_val = compiled(*leaves)
    c_grads = torch.autograd.grad(c_val, leaves)
    e_val = loss(*leaves)
    e_grads = torch.autograd.grad(e_val, leaves)
    torch.testing.assert_close(c_val, e_val)
    for a, b in zip(c_grads, e_grads):
        torch.testing.assert_close(a, b)


def test_out_of_range_target_is_nan_when_not_validated(monkeypatch):
    """Under torch.compile / CUDA-graph capture the host-side range check is skipped: the result is NaN."""
    hidden, weight, targets, _ = make_inputs(shape=(5,))
    targets[:] = torch.tensor([1, 2, 67, -100, 3])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = linear_logprobs(hidden, weight, targets)
    assert out[2].isnan() and out[3] == 0 and torch.isfinite(out[[0, 1, 4]]).all()


def _bad(**overrides):
    hidden, weight, targets, bias = make_inputs(bias=True)
    args = {"hidden": hidden, "weight": weight, "targets": targets, "bias": bias}
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hidden": torch.randn(2, 9, 19, dtype=torch.float64)}, "hidden must have dtype"),
        ({"hidden": torch.randn(19)}, "hidden must have shape"),
        ({"hidden": [[1.0]]}, "hidden must be a torch.Tensor"),
        ({"weight": torch.randn(67, 18)}, "weight's D"),
        ({"weight": torch.randn(67, 19, dtype=torch.float16)}, "weight dtype"),
        ({"weight": torch.randn(0, 19)}, "empty vocabulary"),
        ({"weight": torch.randn(67, 19, 1)}, "weight must have shape"),
        ({"targets": torch.zeros(2, 8, dtype=torch.long)}, "targets shape"),
        ({"targets": torch.zeros(2, 9)}, "targets must be an integer"),
        ({"targets": torch.full((2, 9), 67)}, "targets holds 67"),
        ({"targets": torch.full((2, 9), -5)}, "targets holds -5"),
        ({"bias": torch.randn(66)}, "bias must have shape"),
        ({"bias": torch.randn(67, dtype=torch.float16)}, "bias dtype"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": -3.0}, "softcap"),
        ({"softcap": math.inf}, "softcap"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"ignore_index": 1.5}, "ignore_index"),
        ({"shift": 1}, "shift must be a bool"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(overrides, match):
    args = _bad(**overrides)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("bias"), **args)


@pytest.mark.gpu
def test_mixed_devices_raise_value_error():
    hidden, weight, targets, _ = make_inputs()
    with pytest.raises(ValueError, match="weight is on"):
        linear_logprobs(hidden.cuda(), weight, targets.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_path_never_syncs_with_the_host(deterministic, monkeypatch):
    """Plan, kernels and scatter of the all-fused backend run without a host sync once the (eager-only) target
    check is out of the way (the chunked backends read ``n_valid`` to size their GEMMs)."""
    hidden, weight, targets, bias = make_inputs(shape=(4, 64), dim=64, vocab=1000, device="cuda", bias=True)
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    out = linear_logprobs(
        *leaves[:2], targets, leaves[2], shift=True, deterministic=deterministic, backend="triton"
    )
    torch.autograd.grad(out.sum(), leaves)  # warm-up: autotuning may sync
    torch.cuda.synchronize()
    monkeypatch.setattr(op, "validate_targets", lambda *args: None)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = linear_logprobs(
            *leaves[:2], targets, leaves[2], shift=True, deterministic=deterministic, backend="triton"
        )
        torch.autograd.grad(out.sum(), leaves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
