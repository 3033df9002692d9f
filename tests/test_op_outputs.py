"""``linear_logprobs(..., outputs=...)``: TRL's per-token outputs against a float64 full-logits reference, the
``logit_scale`` option, and the op-level faults (transforms, autocast, option checks)."""

import math

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from prefuse.kernels import TokenOutputs, linear_logprobs
from prefuse.kernels.linear_logprobs import naive_linear_logprobs, naive_token_outputs
from reference import OP_IMPLS as IMPLS
from reference import grad_tol, rel_err

ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "softcap-temperature": {"softcap": 3.0, "temperature": 0.7},
    "bias-logit-scale": {"bias": True, "logit_scale": 0.37},
    "everything": {"shift": True, "bias": True, "softcap": 2.5, "temperature": 1.3, "logit_scale": 1.7},
}


def make_inputs(
    shape=(2, 9), dim=19, vocab=67, dtype=torch.float32, device="cpu", bias=False, scale=1.0, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, dim, generator=gen) * scale).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim)).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[..., : shape[-1] // 3] = -100
    if len(shape) > 1 and shape[0] > 1:
        targets[-1] = -100
    return hidden.to(device), weight.to(device), targets.to(device), None if b is None else b.to(device)


def run_both(backend, hidden, weight, targets, bias, seed=1, **opts):
    """Fused outputs and float64 reference outputs, with the gradients of ``sum(g * logp + g_H * entropy)``."""
    out_shape = naive_linear_logprobs(hidden.double(), weight.double(), targets, **opts).shape
    gen = torch.Generator().manual_seed(seed)
    g, g_h = torch.randn(out_shape, generator=gen), torch.randn(out_shape, generator=gen)
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    out = linear_logprobs(*leaves[:2], targets, leaves[2] if bias is not None else None, outputs=ALL,
                          backend=backend, **opts)  # fmt: skip
    device = hidden.device
    grads = torch.autograd.grad((out.logp * g.to(device) + out.entropy * g_h.to(device)).sum(), leaves)
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    ref = naive_token_outputs(
        *ref_leaves[:2], targets.cpu(), ref_leaves[2] if bias is not None else None, **opts
    )
    ref_grads = torch.autograd.grad((ref.logp * g.double() + ref.entropy * g_h.double()).sum(), ref_leaves)
    return out, grads, ref, ref_grads


def top_gap(hidden, weight, targets, bias, **opts):
    """float64 margin between the largest and second-largest scaled logit (is_top1 is compared where it is clear)."""
    opts = {k: v for k, v in opts.items() if k != "shift"}
    logits = torch.nn.functional.linear(
        hidden.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu()
    )
    logits = logits * opts.get("logit_scale", 1.0)
    if opts.get("softcap") is not None:
        logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
    top2 = (logits / opts.get("temperature", 1.0)).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def check_outputs(out, grads, ref, ref_grads, dtype, ignored, gap=None):
    assert isinstance(out, TokenOutputs)
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        value = getattr(out, name)
        assert value.dtype == torch.float32 and value.shape == ref.logp.shape, name
        assert torch.isfinite(value).all(), name
        assert (value[ignored] == 0).all(), name
        assert rel_err(value, getattr(ref, name)) <= 1e-5, name
    assert out.is_top1.dtype == torch.bool and not out.is_top1[ignored].any()
    clear = torch.ones_like(ref.is_top1) if gap is None else gap > 1e-4
    assert torch.equal(out.is_top1.cpu()[clear], ref.is_top1[clear])
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, rg) <= grad_tol(dtype)


def ignored_mask(targets, shift=False):
    return ((targets[..., 1:] if shift else targets) == -100).cpu()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIONS)
def test_token_outputs_match_float64_reference(impl, dtype, name):
    opts = dict(OPTIONS[name])
    with_bias = opts.pop("bias", False)
    hidden, weight, targets, bias = make_inputs(dtype=dtype, device=impl[1], bias=with_bias)
    out, grads, ref, ref_grads = run_both(impl[0], hidden, weight, targets, bias, **opts)
    shift = opts.get("shift", False)
    gap = top_gap(hidden[..., :-1, :] if shift else hidden, weight, targets, bias, **opts)
    check_outputs(out, grads, ref, ref_grads, dtype, ignored_mask(targets, shift), gap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape, dim, vocab",
    [((1,), 5, 3), ((3, 1, 5), 33, 129), ((13,), 17, 1), ((4, 7), 8, 1000)],
    ids=["single-token", "3d-odd", "vocab-1", "vocab-1000"],
)
def test_token_outputs_odd_shapes(impl, shape, dim, vocab):
    hidden, weight, targets, bias = make_inputs(shape=shape, dim=dim, vocab=vocab, device=impl[1], bias=True)
    targets[..., -1] = 0
    out, grads, ref, ref_grads = run_both(impl[0], hidden, weight, targets, bias)
    check_outputs(out, grads, ref, ref_grads, torch.float32, ignored_mask(targets),
                  top_gap(hidden, weight, targets, bias) if vocab > 1 else None)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_token_outputs_huge_logits(impl):
    """Logits ~1e4: every statistic stays finite and accurate (online max and rescaled sums)."""
    hidden, weight, targets, bias = make_inputs(scale=2e3, device=impl[1], bias=True)
    out, grads, ref, ref_grads = run_both(impl[0], hidden, weight, targets, bias)
    for name in ("logp", "log_sum_sq_probs", "mean_logits"):
        assert rel_err(getattr(out, name), getattr(ref, name)) <= 1e-5, name
    # the entropy of a near-one-hot distribution is tiny: absolute error against the logits' scale
    assert (out.entropy.double().cpu() - ref.entropy).abs().max() <= 1e-3
    assert torch.equal(out.is_top1.cpu(), ref.is_top1)
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g, rg) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_token_outputs_all_ignored(impl):
    hidden, weight, targets, _ = make_inputs(device=impl[1])
    targets.fill_(-100)
    hidden.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, outputs=ALL, backend=impl[0])
    assert all((getattr(out, n) == 0).all() for n in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"))
    assert not out.is_top1.any()
    (out.logp.sum() + out.entropy.sum()).backward()
    assert (hidden.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_gradient_with_frozen_head(impl):
    """Only the entropy flows back (no log-prob gradient), into hidden alone: the frozen head gets nothing."""
    hidden, weight, targets, bias = make_inputs(device=impl[1], bias=True)
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight, targets, bias, outputs=("entropy",), softcap=4.0, backend=impl[0])
    assert out.log_sum_sq_probs is None and out.mean_logits is None and out.is_top1 is None
    (grad,) = torch.autograd.grad(out.entropy.sum(), [h])
    h64 = hidden.double().cpu().requires_grad_()
    ref = naive_token_outputs(h64, weight.double().cpu(), targets.cpu(), bias.double().cpu(), softcap=4.0)
    (ref_grad,) = torch.autograd.grad(ref.entropy.sum(), [h64])
    assert weight.grad is None and bias.grad is None
    assert rel_err(grad, ref_grad) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_is_top1_is_the_first_argmax(impl):
    """Two identical weight rows tie exactly: only the first of them counts as the top-1 token."""
    hidden, weight, targets, _ = make_inputs(shape=(6,), device=impl[1])
    weight[5] = hidden[0] * 3.0  # dominant for every row sharing hidden[0]'s direction
    weight[40] = weight[5]
    hidden[:] = hidden[0]
    targets[:] = torch.tensor([5, 40, 5, 40, 7, -100])
    out = linear_logprobs(hidden, weight, targets, outputs=("is_top1",), backend=impl[0])
    assert out.is_top1.tolist() == [True, False, True, False, False, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_scale_matches_reference(impl):
    """``logit_scale`` multiplies the raw logits before the softcap (TRL's order), for values and gradients."""
    hidden, weight, targets, bias = make_inputs(device=impl[1], bias=True)
    out, grads, ref, ref_grads = run_both(
        impl[0], hidden, weight, targets, bias, logit_scale=2.5, softcap=1.5
    )
    check_outputs(out, grads, ref, ref_grads, torch.float32, ignored_mask(targets))
    # and differs from the unscaled head, so the option is not silently dropped
    plain = naive_linear_logprobs(hidden.double().cpu(), weight.double().cpu(), targets.cpu(), bias.double().cpu(),
                                  softcap=1.5)  # fmt: skip
    assert rel_err(out.logp, plain) > 1e-2


def test_outputs_empty_returns_the_log_prob_tensor():
    hidden, weight, targets, _ = make_inputs()
    plain = linear_logprobs(hidden, weight, targets)
    out = linear_logprobs(hidden, weight, targets, outputs=("mean_logits",))
    assert isinstance(plain, torch.Tensor) and not isinstance(plain, tuple)
    assert out.entropy is None and out.mean_logits is not None
    torch.testing.assert_close(out.logp, plain, rtol=0, atol=0)


def test_stats_of_a_non_finite_hidden_row_are_nan():
    hidden, weight, targets, _ = make_inputs(shape=(5,))
    targets[:] = 1
    hidden[2, 0] = math.inf
    out = linear_logprobs(hidden, weight, targets, outputs=ALL)
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert getattr(out, name)[2].isnan() and torch.isfinite(getattr(out, name)[[0, 1, 3, 4]]).all(), name
    assert not out.is_top1[2]


def test_torch_compile_with_entropy_traces_without_graph_break():
    hidden, weight, targets, bias = make_inputs(bias=True)

    def loss(h, w, b):
        out = linear_logprobs(h, w, targets, b, shift=True, logit_scale=0.5, outputs=("entropy", "is_top1"))
        return (out.logp**2).sum() + out.entropy.sum() + out.is_top1.sum()

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    c_val = compiled(*leaves)
    c_grads = torch.autograd.grad(c_val, leaves)
    e_val = loss(*leaves)
    e_grads = torch.autograd.grad(e_val, leaves)
    torch.testing.assert_close(c_val, e_val)
    for a, b in zip(c_grads, e_grads):
        torch.testing.assert_close(a, b)


# --- faults -------------------------------------------------------------------------------------------------


def _head():
    hidden, weight, targets, _ = make_inputs(shape=(5,))
    targets[0] = -100
    return hidden, weight, targets


def test_forward_mode_ad_raises_instead_of_a_zero_tangent():
    hidden, weight, targets = _head()
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(hidden, torch.ones_like(hidden))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            linear_logprobs(dual, weight, targets)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "grad", "jacrev"])
def test_torch_func_transforms_raise_a_clear_error(transform):
    hidden, weight, targets = _head()

    def f(h):
        return linear_logprobs(h, weight, targets).sum()

    calls = {
        "jvp": lambda: torch.func.jvp(f, (hidden,), (torch.ones_like(hidden),)),
        "jacfwd": lambda: torch.func.jacfwd(f)(hidden),
        "grad": lambda: torch.func.grad(f)(hidden),
        "jacrev": lambda: torch.func.jacrev(f)(hidden),
    }
    with pytest.raises(NotImplementedError, match="does not support the torch.func transforms"):
        calls[transform]()


def test_vmap_over_batched_targets_matches_a_loop():
    """vmap alone works (values and reverse-mode gradients), also over per-entry targets whose range check would
    otherwise branch on batched data."""
    hidden, weight, _, bias = make_inputs(shape=(3, 6), bias=True)
    targets = torch.randint(0, 67, (3, 6), generator=torch.Generator().manual_seed(2))
    targets[0, :2] = -100
    targets[2] = -100
    h = hidden.clone().requires_grad_()
    out = torch.func.vmap(lambda x, t: linear_logprobs(x, weight, t, bias, shift=True))(h, targets)
    (grad,) = torch.autograd.grad(out.sum(), [h])
    h_loop = hidden.clone().requires_grad_()
    loop = torch.stack([linear_logprobs(h_loop[i], weight, targets[i], bias, shift=True) for i in range(3)])
    (grad_loop,) = torch.autograd.grad(loop.sum(), [h_loop])
    torch.testing.assert_close(out, loop)
    torch.testing.assert_close(grad, grad_loop)


def test_autocast_cpu_bf16_forward_and_backward_accumulate_in_fp32():
    """Under autocast the op still computes fp32 logits (fp32 inputs stay fp32), and backward runs."""
    hidden, weight, targets, bias = make_inputs(shape=(3, 8), dim=32, vocab=300, bias=True, scale=3.0)
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(4))
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs(*leaves[:2], targets, leaves[2], backend="torch", outputs=("entropy",))
        grads = torch.autograd.grad((out.logp * grad_out + out.entropy).sum(), leaves)
    ref_leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    ref = naive_token_outputs(*ref_leaves[:2], targets, ref_leaves[2])
    ref_grads = torch.autograd.grad((ref.logp * grad_out.double() + ref.entropy).sum(), ref_leaves)
    assert out.logp.dtype == torch.float32
    assert rel_err(out.logp, ref.logp) <= 1e-5 and rel_err(out.entropy, ref.entropy) <= 1e-5
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and rel_err(g, rg) <= 1e-4


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"temperature": 1e-39}, "temperature"),
        ({"temperature": 1e-30, "logit_scale": 1e10}, "temperature"),
        ({"ignore_index": 2**70}, "ignore_index"),
        ({"ignore_index": -(2**63) - 1}, "ignore_index"),
        ({"deterministic": "no"}, "deterministic"),
        ({"deterministic": 1}, "deterministic"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"logit_scale": math.nan}, "logit_scale"),
        ({"logit_scale": "1"}, "logit_scale"),
        ({"outputs": "entropy"}, "outputs"),
        ({"outputs": ("entropy", "perplexity")}, "outputs"),
        ({"outputs": None}, "outputs"),
        ({"filter_eps": 0.0}, "filter_eps"),
        ({"filter_eps": 1.0}, "filter_eps"),
        ({"filter_eps": True}, "filter_eps"),
        ({"filter_eps": 1e-6, "backend": "triton"}, "filter_eps"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(overrides, match):
    hidden, weight, targets = _head()
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, targets, **overrides)


def test_ignore_index_at_the_int64_limits_is_accepted():
    hidden, weight, targets = _head()
    targets[0] = 3
    out = linear_logprobs(hidden, weight, targets, ignore_index=2**63 - 1)
    assert torch.isfinite(out).all() and (out != 0).all()
