"""Hardening with hypothesis: ``linear_logprobs`` and every loss module over random shapes, dtypes, ignore
patterns, label layouts, memory layouts and options, plus tables of bad inputs.

Properties, for valid inputs: no exception; float32 output / a 0-d loss, finite for finite inputs; metrics
finite and detached; gradients finite, of the input's shape and dtype; agreement with a float64 reference
(the op: ``test_linear_logprobs.reference``; the losses: ``naive_linear_logprobs`` in float64 feeding the
independent formulas of ``test_losses_dpo.naive_dpo`` / ``test_losses_kto.naive_kto`` for DPO, SamPO and KTO,
and the ``functional`` formulas, themselves checked against independent references in ``test_losses_*.py``,
for the others). For bad inputs: a ``ValueError`` whose message names the problem, nothing else.

Memory layouts: contiguous, transposed (non-contiguous), strided slices, and ``expand``-ed (stride-0) hidden
states, weights, biases and targets; int32 targets / labels. Empty batches (0 rows) for every loss. Non-finite
hidden states: NaN at the positions that read them (documented choice of ``linear_logprobs``), so a loss over
such a row is NaN, never an exception. Mixed devices: a ``ValueError`` naming the tensor (tested with the
``meta`` device here, and with CUDA under the ``gpu`` marker).

Budget: every property runs a fixed, derandomized number of examples (``BUDGET``), so CI time is bounded and
reproducible; the file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefuse.alignment import (
    DPO_LOSS_TYPES,
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
from prefuse.alignment import functional as PF
from prefuse.alignment.methods import METHODS
from prefuse.kernels import linear_logprobs, vocab_parallel_linear_logprobs
from prefuse.kernels.linear_logprobs import naive_linear_logprobs
from reference import SMOOTHING, grad_tol, naive_dpo, naive_kto, rel_err
from reference import op_reference as reference

pytestmark = (
    pytest.mark.slow
)  # property-based sweeps over every loss and option: CI runs it, `-m "not slow"` skips it

HAS_CUDA = torch.cuda.is_available()


def budget(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def close_normwise(actual, expected, tol: float, floor: float) -> bool:
    """``max|a - e| <= tol * max(max|e|, floor)``: relative to the largest expected entry, absolute near 0."""
    if expected.numel() == 0:
        return actual.numel() == 0
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(float(expected.abs().max()), floor)
    return float((actual - expected).abs().max()) <= tol * scale


# =============================================================================================== the op
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN_LAYOUTS = ["contiguous", "transposed", "strided", "expanded-rows", "expanded-dim"]


@st.composite
def op_cases(draw, max_tokens: int = 60):
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    if math.prod(lead) > max_tokens:
        lead = [1] * (len(lead) - 1) + [min(lead[-1], 4)]
    vocab = draw(st.integers(1, 70))
    return {
        "lead": lead,
        "dim": draw(st.integers(1, 24)),
        "vocab": vocab,
        "dtype": draw(st.sampled_from(DTYPES)),
        "bias": draw(st.sampled_from([None, "contiguous", "expanded"])),
        "shift": draw(st.booleans()),
        "ignore_index": draw(st.sampled_from([-100, -1, 0, vocab - 1, vocab + 5])),
        "ignore_p": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "temperature": draw(st.sampled_from([1.0, 0.3, 2.5])),
        "softcap": draw(st.sampled_from([None, 0.7, 30.0])),
        "scale": draw(st.sampled_from([0.1, 1.0, 40.0, 1000.0])),
        "hidden_layout": draw(st.sampled_from(HIDDEN_LAYOUTS)),
        "weight_layout": draw(st.sampled_from(["contiguous", "transposed", "expanded"])),
        "targets_layout": draw(st.sampled_from(["contiguous", "transposed", "expanded"])),
        "int32": draw(st.booleans()),
        "deterministic": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _layout_hidden(layout, lead, dim, gen, scale, dtype):
    """A leaf of the right storage and the ``(*lead, dim)`` view of it for ``layout``."""
    if layout == "transposed" and len(lead) >= 2:
        leaf = torch.randn(*lead[:-2], lead[-1], lead[-2], dim, generator=gen)

        def view(x):
            return x.transpose(-2, -3)
    elif layout == "transposed":
        leaf = torch.randn(dim, lead[0], generator=gen)

        def view(x):  # stride along D is not 1
            return x.T
    elif layout == "strided":
        leaf = torch.randn(*lead[:-1], 2 * lead[-1], dim + 3, generator=gen)

        def view(x):
            return x[..., ::2, 1 : dim + 1]
    elif layout == "expanded-rows":
        leaf = torch.randn(*lead[:-1], 1, dim, generator=gen)

        def view(x):
            return x.expand(*lead, dim)
    elif layout == "expanded-dim":
        leaf = torch.randn(*lead, 1, generator=gen)

        def view(x):
            return x.expand(*lead, dim)
    else:
        leaf = torch.randn(*lead, dim, generator=gen)

        def view(x):
            return x

    return (leaf * scale).to(dtype), view


def build_op_case(case):
    gen = torch.Generator().manual_seed(case["seed"])
    lead, dim, vocab, dtype = case["lead"], case["dim"], case["vocab"], case["dtype"]
    h_leaf, h_view = _layout_hidden(case["hidden_layout"], lead, dim, gen, case["scale"], dtype)
    w = torch.randn(vocab, dim, generator=gen) / math.sqrt(dim) * 2
    if case["weight_layout"] == "transposed":
        w_leaf, w_view = w.T.contiguous(), (lambda x: x.T)
    elif case["weight_layout"] == "expanded":
        w_leaf, w_view = w[:1].clone(), (lambda x: x.expand(vocab, dim))
    else:
        w_leaf, w_view = w, (lambda x: x)
    w_leaf = w_leaf.to(dtype)
    b_leaf, b_view = None, None
    if case["bias"] == "contiguous":
        b_leaf, b_view = torch.randn(vocab, generator=gen).to(dtype), (lambda x: x)
    elif case["bias"] == "expanded":
        b_leaf, b_view = torch.randn(1, generator=gen).to(dtype), (lambda x: x.expand(vocab))
    targets = torch.randint(0, vocab, tuple(lead), generator=gen)
    targets[torch.rand(tuple(lead), generator=gen) < case["ignore_p"]] = case["ignore_index"]
    if case["targets_layout"] == "transposed" and len(lead) >= 2:
        targets = targets.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif case["targets_layout"] == "expanded":
        targets = targets[..., :1].expand(*lead) if lead[-1] else targets
    if case["int32"]:
        targets = targets.int()
    out_shape = (*lead[:-1], max(lead[-1] - 1, 0)) if case["shift"] else tuple(lead)
    grad_out = torch.randn(out_shape, generator=gen)
    options = {k: case[k] for k in ("shift", "ignore_index", "temperature", "softcap")}
    return (h_leaf, h_view), (w_leaf, w_view), (b_leaf, b_view), targets, grad_out, options


def run_op(backend, case):
    (h_leaf, h_view), (w_leaf, w_view), (b_leaf, b_view), targets, grad_out, options = build_op_case(case)
    leaves = [h_leaf.clone().requires_grad_(), w_leaf.clone().requires_grad_()]
    if b_leaf is not None:
        leaves.append(b_leaf.clone().requires_grad_())
    views = [h_view(leaves[0]), w_view(leaves[1])] + ([b_view(leaves[2])] if b_leaf is not None else [])
    out = linear_logprobs(
        views[0], views[1], targets, views[2] if b_leaf is not None else None, backend=backend,
        deterministic=case["deterministic"], **options,
    )  # fmt: skip
    grads = (
        torch.autograd.grad((out * grad_out).sum(), views)
        if out.numel()
        else [torch.zeros_like(v) for v in views]
    )
    return out, grads, views, targets, grad_out, options


def check_op(backend, case):
    out, grads, views, targets, grad_out, options = run_op(backend, case)
    dtype = case["dtype"]
    ref, ref_grads = reference(
        views[0], views[1], targets, views[2] if len(views) > 2 else None, grad_out, **options
    )
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all(), "finite inputs must give finite log-probs"
    scored = (targets[..., 1:] if options["shift"] else targets) != options["ignore_index"]
    assert (out[~scored] == 0).all(), "ignored positions are exactly 0.0"
    assert (out[scored] <= 1e-6).all(), "a log-probability is <= 0"
    # Rounding is relative to the size of the terms summed, not of the result (which may cancel to ~0): the
    # floors are the logits' magnitude for the values and one term's magnitude for each gradient.
    h64, w64 = views[0].detach().double(), views[1].detach().double()
    inv_t, g_max = 1.0 / options["temperature"], float(grad_out.abs().max()) if grad_out.numel() else 0.0
    logits = h64 @ w64.T + (views[2].detach().double() if len(views) > 2 else 0.0)
    logit_max = float(logits.abs().max()) * inv_t if logits.numel() else 0.0
    assert close_normwise(out, ref, 1e-5, max(1.0, logit_max)), rel_err(out, ref)
    h_max = float(h64.abs().max()) if h64.numel() else 0.0
    floors = {
        "hidden": g_max * inv_t * float(w64.abs().max()),
        "weight": g_max * inv_t * h_max,
        "bias": g_max * inv_t,
    }
    for name, g, rg, v in zip(("hidden", "weight", "bias"), grads, ref_grads, views):
        assert g.shape == v.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert close_normwise(g, rg, grad_tol(dtype), floors[name]), (name, rel_err(g, rg))


@budget(400)
@given(case=op_cases())
def test_op_property_torch(case):
    check_op("torch", case)


@pytest.mark.interpret
@budget(100)
@given(case=op_cases(max_tokens=24))
def test_op_property_triton_interpreter(case):
    check_op("triton", case)


@budget(80)
@given(case=op_cases(), where=st.sampled_from(["nan", "inf", "-inf"]))
def test_op_non_finite_hidden_is_nan_at_its_own_positions(case, where):
    """Documented choice: a scored position whose hidden row holds NaN/±inf is NaN (also under a softcap,
    which would saturate an infinite logit to a finite value); every other position is unchanged."""
    case = dict(case, hidden_layout="contiguous", lead=[3, max(case["lead"][-1], 2)], ignore_p=0.3)
    (h_leaf, _), (w_leaf, w_view), (b_leaf, b_view), targets, _, options = build_op_case(case)
    weight, bias = w_view(w_leaf), (b_view(b_leaf) if b_leaf is not None else None)
    clean = linear_logprobs(h_leaf, weight, targets, bias, backend="torch", **options)
    dirty = h_leaf.clone()
    dirty[1, 0, case["dim"] // 2] = float(where)
    out = linear_logprobs(dirty, weight, targets, bias, backend="torch", **options)
    scored = (targets[..., 1:] if options["shift"] else targets) != options["ignore_index"]
    reads_row = torch.zeros_like(scored)
    reads_row[1, 0] = True  # output (1, 0) reads hidden row (1, 0), shifted or not
    assert out[reads_row & scored].isnan().all()
    assert (out[reads_row & ~scored] == 0).all()
    assert torch.equal(out[~reads_row], clean[~reads_row])


# ----------------------------------------------------------------------------------------------- bad op inputs
def _with(**changes):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})


def _set_target(value):
    def mutate(a):
        t = a["targets"].clone()
        t.view(-1)[0] = value
        a["targets"] = t

    return mutate


BAD_OP_INPUTS = {
    # name: (mutation of valid arguments, the ValueError's message must match)
    "hidden float64": (_with(hidden=lambda a: a["hidden"].double()), "hidden must have dtype"),
    "hidden int64": (_with(hidden=lambda a: a["hidden"].long()), "hidden must have dtype"),
    "hidden 1-D": (_with(hidden=lambda a: a["hidden"].reshape(-1)), "hidden must have shape"),
    "hidden 0-d": (_with(hidden=torch.tensor(1.0)), "hidden must have shape"),
    "hidden a list": (_with(hidden=[[1.0, 2.0]]), "hidden must be a torch.Tensor"),
    "hidden None": (_with(hidden=None), "hidden must be a torch.Tensor"),
    "weight other dtype": (_with(weight=lambda a: a["weight"].half()), "weight dtype"),
    "weight wrong D": (_with(weight=lambda a: a["weight"][:, :-1]), "weight's D"),
    "weight 1-D": (_with(weight=lambda a: a["weight"][0]), r"weight must have shape \(V, D\)"),
    "weight 3-D": (_with(weight=lambda a: a["weight"][None]), r"weight must have shape \(V, D\)"),
    "weight V = 0": (_with(weight=lambda a: a["weight"][:0]), "empty vocabulary"),
    "weight None": (_with(weight=None), "weight must be a torch.Tensor"),
    "targets float": (_with(targets=lambda a: a["targets"].float()), "targets must be an integer"),
    "targets bool": (_with(targets=lambda a: a["targets"] > 0), "targets must be an integer"),
    "targets complex": (_with(targets=lambda a: a["targets"].cfloat()), "targets must be an integer"),
    "targets shape": (_with(targets=lambda a: a["targets"][..., :-1]), "targets shape"),
    "targets a list": (_with(targets=lambda a: a["targets"].tolist()), "targets must be a torch.Tensor"),
    "target = V": (_set_target(9), "targets holds 9, outside"),
    "target = -5 (not ignore_index)": (_set_target(-5), "targets holds -5"),
    "target = int64 max": (_set_target(2**63 - 1), "outside"),
    "bias wrong length": (_with(bias=lambda a: a["bias"][:-1]), r"bias must have shape \(V,\)"),
    "bias other dtype": (_with(bias=lambda a: a["bias"].double()), "bias must have dtype"),
    "bias 2-D": (_with(bias=lambda a: a["bias"][None]), r"bias must have shape \(V,\)"),
    "bias a float": (_with(bias=0.5), "bias must be a torch.Tensor"),
    "temperature 0": (_with(temperature=0.0), "temperature must be finite and > 0"),
    "temperature -1": (_with(temperature=-1.0), "temperature must be finite and > 0"),
    "temperature nan": (_with(temperature=math.nan), "temperature must be finite and > 0"),
    "temperature inf": (_with(temperature=math.inf), "temperature must be finite and > 0"),
    "temperature True": (_with(temperature=True), "temperature must be a real number"),
    "temperature '1'": (_with(temperature="1"), "temperature must be a real number"),
    "temperature None": (_with(temperature=None), "temperature must be a real number"),
    "softcap 0": (_with(softcap=0.0), "softcap must be finite and > 0"),
    "softcap -3": (_with(softcap=-3.0), "softcap must be finite and > 0"),
    "softcap inf": (_with(softcap=math.inf), "softcap must be finite and > 0"),
    "softcap nan": (_with(softcap=math.nan), "softcap must be finite and > 0"),
    "softcap 'x'": (_with(softcap="x"), "softcap must be a real number"),
    "ignore_index 1.5": (_with(ignore_index=1.5), "ignore_index must be an int"),
    "ignore_index True": (_with(ignore_index=True), "ignore_index must be an int"),
    "ignore_index None": (_with(ignore_index=None), "ignore_index must be an int"),
    "shift 1": (_with(shift=1), "shift must be a bool"),
    "shift None": (_with(shift=None), "shift must be a bool"),
    "backend 'cuda'": (_with(backend="cuda"), "backend must be one of"),
    "backend None": (_with(backend=None), "backend must be one of"),
    "targets on another device (meta)": (
        _with(targets=lambda a: a["targets"].to("meta")),
        "targets is on meta",
    ),
    "weight on another device (meta)": (_with(weight=lambda a: a["weight"].to("meta")), "weight is on meta"),
    "bias on another device (meta)": (_with(bias=lambda a: a["bias"].to("meta")), "bias is on meta"),
}


def valid_op_arguments(seed: int, lead: list, dim: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 9, tuple(lead), generator=gen)
    return {
        "hidden": torch.randn(*lead, dim, generator=gen),
        "weight": torch.randn(9, dim, generator=gen),
        "targets": targets,
        "bias": torch.randn(9, generator=gen),
    }


@budget(300)
@given(
    bad=st.sampled_from(sorted(BAD_OP_INPUTS)),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dim=st.integers(2, 8),
    seed=st.integers(0, 100),
    function=st.sampled_from(["linear_logprobs", "vocab_parallel_linear_logprobs"]),
)
def test_op_bad_inputs_raise_value_error(bad, lead, dim, seed, function):
    mutate, message = BAD_OP_INPUTS[bad]
    args = valid_op_arguments(seed, lead, dim)
    mutate(args)
    hidden, weight, targets, bias = (args.pop(k) for k in ("hidden", "weight", "targets", "bias"))
    if function == "vocab_parallel_linear_logprobs":
        args.update(vocab_start=0, vocab_size=9)
        call = vocab_parallel_linear_logprobs
    else:
        call = linear_logprobs
    with pytest.raises(ValueError, match=message):
        call(hidden, weight, targets, bias, **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_start": 0.0, "vocab_size": 9}, "vocab_start must be an int"),
        ({"vocab_start": True, "vocab_size": 9}, "vocab_start must be an int"),
        ({"vocab_start": 0, "vocab_size": "9"}, "vocab_size must be an int"),
        ({"vocab_start": -1, "vocab_size": 9}, "must lie inside"),
        ({"vocab_start": 0, "vocab_size": 8}, "must lie inside"),
        ({"vocab_start": 0, "vocab_size": 12}, "must be the whole vocabulary"),
    ],
)
def test_vocab_parallel_bad_shard_arguments(kwargs, message):
    args = valid_op_arguments(0, [2, 3], 4)
    with pytest.raises(ValueError, match=message):
        vocab_parallel_linear_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["weight", "targets", "bias"])
def test_op_mixed_cuda_and_cpu_raise_value_error(which):
    args = valid_op_arguments(0, [2, 5], 8)
    args = {k: (v if k == which else v.cuda()) for k, v in args.items()}
    with pytest.raises(ValueError, match=f"{which} is on cpu but hidden is on cuda"):
        linear_logprobs(args["hidden"], args["weight"], args["targets"], args["bias"])


# =============================================================================================== the losses
PAIRED = [name for name, method in METHODS.items() if method.paired]
UNPAIRED = [name for name, method in METHODS.items() if not method.paired]
REFERENCE_FREE = ("simpo", "orpo", "cpo")


@st.composite
def loss_cases(draw, method=None):
    method = method or draw(st.sampled_from(PAIRED + UNPAIRED))
    rows = 2 * draw(st.integers(0, 3)) if method in PAIRED else draw(st.integers(0, 4))
    steps = draw(st.integers(1, 7))
    vocab = draw(st.integers(1, 30))
    case = {
        "method": method,
        "rows": rows,
        "T": steps,
        "D": draw(st.integers(1, 10)),
        "V": vocab,
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "bias": draw(st.booleans()),
        "shift": draw(st.booleans()),
        "ignore_index": draw(st.sampled_from([-100, -1])),
        "layouts": draw(
            st.lists(
                st.tuples(st.integers(0, steps), st.integers(0, steps), st.booleans()),
                min_size=rows,
                max_size=rows,
            )
        ),
        "reference": draw(st.sampled_from(["hidden", "sums", "per_token"])),
        "int32": draw(st.booleans()),
        "labels_transposed": draw(st.booleans()),
        "hidden_layout": draw(st.sampled_from(["contiguous", "transposed", "expanded-rows"])),
        "temperature": draw(st.sampled_from([1.0, 0.6])),
        "softcap": draw(st.sampled_from([None, 4.0])),
        "scale": draw(st.sampled_from([2.0, 0.1, 30.0])),
        "beta": draw(st.sampled_from([0.05, 0.5, 2.0])),
        "nll_weight": draw(st.sampled_from([0.0, 0.5])),
        "loss_type": draw(st.sampled_from(DPO_LOSS_TYPES)),
        "smoothing": draw(st.booleans()),
        "kl_rows": draw(st.integers(0, 3)),
        "kl_given": draw(st.booleans()),
        "kl_sentences": draw(st.booleans()),
        "flag": draw(st.booleans()),  # cpo average_log_prob, gpo clamp
        "seed": draw(st.integers(0, 2**16)),
    }
    if method in ("sampo", "factalign") and case["reference"] == "sums":
        case["reference"] = "per_token"  # both need per-token reference log-probs (sums raise: tested below)
    return case


def make_labels(case, rows: int, gen) -> torch.Tensor:
    """Per row: ``(prompt, completion, left_pad)`` from ``case["layouts"]`` (cycled), clipped to ``T``; the
    rest is padding (left or right); prompt and padding carry ``ignore_index``."""
    steps, ignore = case["T"], case["ignore_index"]
    labels = torch.full((rows, steps), ignore, dtype=torch.long)
    layouts = case["layouts"] or [(1, steps, False)]
    for r in range(rows):
        prompt, completion, left = layouts[r % len(layouts)]
        prompt = min(prompt, steps)
        completion = min(completion, steps - prompt)
        start = (steps - prompt - completion if left else 0) + prompt
        labels[r, start : start + completion] = torch.randint(0, case["V"], (completion,), generator=gen)
    return labels.int() if case["int32"] else labels


def sentences(labels: torch.Tensor, ignore: int, gen) -> tuple[torch.Tensor, int]:
    """Random sentences over the completion tokens (1-3 tokens each, a few tokens outside any), numbered over
    the rows."""
    ids = torch.full(labels.shape, -1, dtype=torch.long)
    count = 0
    for r in range(labels.shape[0]):
        positions = torch.nonzero(labels[r] != ignore).flatten().tolist()
        i = 0
        while i < len(positions):
            length = int(torch.randint(1, 4, (1,), generator=gen))
            if float(torch.rand(1, generator=gen)) < 0.8:
                for p in positions[i : i + length]:
                    ids[r, p] = count
                count += 1
            i += length
    return ids, count


class LossCase:
    """A valid call of one loss module (random data from ``case``), and its float64 reference."""

    def __init__(self, case: dict):
        self.case = c = case
        gen = torch.Generator().manual_seed(c["seed"])
        rows, steps, dim, vocab, dtype = c["rows"], c["T"], c["D"], c["V"], c["dtype"]
        self.labels = make_labels(c, rows, gen)
        if c.get("labels_transposed"):  # the same values in a column-major (non-contiguous) tensor
            self.labels = self.labels.t().contiguous().t()
        self.length = steps - 1 if c["shift"] else steps
        self.mask = (self.labels[:, 1:] if c["shift"] else self.labels) != c["ignore_index"]
        if c["hidden_layout"] == "transposed":
            self.h_leaf, self.h_view = (
                torch.randn(steps, rows, dim, generator=gen),
                (lambda x: x.transpose(0, 1)),
            )
        elif c["hidden_layout"] == "expanded-rows":
            self.h_leaf = torch.randn(1, steps, dim, generator=gen)
            self.h_view = lambda x: x.expand(rows, steps, dim)
        else:
            self.h_leaf, self.h_view = torch.randn(rows, steps, dim, generator=gen), (lambda x: x)
        self.h_leaf = (self.h_leaf * c.get("scale", 2.0)).to(dtype)
        self.weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim) * 2).to(dtype)
        self.bias = (torch.randn(vocab, generator=gen) * 0.5).to(dtype) if c["bias"] else None
        self.ref_hidden = (torch.randn(rows, steps, dim, generator=gen) * 2).to(dtype)
        self.ref_weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim) * 2).to(dtype)
        self.ref_bias = (torch.randn(vocab, generator=gen) * 0.5).to(dtype) if c["bias"] else None
        self.ref_tokens = torch.where(self.mask, torch.rand(rows, self.length, generator=gen) * -4, 0.0)
        b = rows // 2
        self.extra = {}
        if c["method"] == "sppo":
            self.extra = {
                "p_chosen": torch.rand(b, generator=gen),
                "p_rejected": torch.rand(b, generator=gen),
            }
        elif c["method"] == "gpo":
            self.extra = {
                "s_chosen": torch.randn(b, generator=gen),
                "s_rejected": torch.randn(b, generator=gen),
            }
        if c["method"] in UNPAIRED:
            self.desirable = torch.rand(rows, generator=gen) < 0.5
            n_kl = c["kl_rows"]
            self.kl_labels = make_labels(c, n_kl, gen)
            self.kl_hidden = (torch.randn(n_kl, steps, dim, generator=gen) * 2).to(dtype)
            self.ref_kl_hidden = (torch.randn(n_kl, steps, dim, generator=gen) * 2).to(dtype)
            kl_mask = (self.kl_labels[:, 1:] if c["shift"] else self.kl_labels) != c["ignore_index"]
            self.ref_kl_tokens = torch.where(kl_mask, torch.rand(n_kl, self.length, generator=gen) * -4, 0.0)
        if c["method"] == "factalign":
            self.sentence_ids, n_sentences = sentences(self.labels, c["ignore_index"], gen)
            self.sentence_labels = torch.rand(n_sentences, generator=gen) < 0.5
            self.kl_sentence_ids = sentences(self.kl_labels, c["ignore_index"], gen)[0]

    # ------------------------------------------------------------------------------------------- prefuse
    def module(self):
        c = self.case
        opts = {
            "ignore_index": c["ignore_index"],
            "temperature": c["temperature"],
            "softcap": c["softcap"],
            "backend": "torch",
        }
        beta, nll = c["beta"], c["nll_weight"]
        method = c["method"]
        if method == "dpo":
            # exo_pair takes log ε: ε = 0 is refused (as TRL does), so its unsmoothed case is the EXO default 1e-3
            unsmoothed = 1e-3 if c["loss_type"] == "exo_pair" else 0.0
            eps = SMOOTHING.get(c["loss_type"], 0.0) if c["smoothing"] else unsmoothed
            return DPOLoss(beta, c["loss_type"], eps, nll, **opts)
        if method == "sampo":
            return SamPOLoss(beta, seed=c["seed"], nll_weight=nll, **opts)
        if method == "sppo":
            return SPPOLoss(beta, **opts)
        if method == "gpo":
            return GPOLoss(beta, clamp=2.0 if c["flag"] else None, **opts)
        if method == "simpo":
            return SimPOLoss(
                beta, gamma=0.3, label_smoothing=0.1 if c["smoothing"] else 0.0, nll_weight=nll, **opts
            )
        if method == "orpo":
            return ORPOLoss(beta, nll_weight=nll, **opts)
        if method == "cpo":
            return CPOLoss(beta, 0.1 if c["smoothing"] else 0.0, nll, average_log_prob=c["flag"], **opts)
        if method == "kto":
            return KTOLoss(beta, desirable_weight=1.3, **opts)
        return FactAlignLoss(beta, fg_beta=0.5, **opts)

    def reference_kwargs(self, prefix: str = "") -> dict:
        c = self.case
        if c["method"] in REFERENCE_FREE:
            return {}
        if c["reference"] == "hidden":
            hidden = self.ref_hidden if not prefix else self.ref_kl_hidden
            return {f"ref_{prefix}hidden": hidden, "ref_weight": self.ref_weight, "ref_bias": self.ref_bias}
        tokens = self.ref_tokens if not prefix else self.ref_kl_tokens
        return {f"ref_{prefix}logps": tokens.sum(-1) if c["reference"] == "sums" else tokens}

    def call(self, module, hidden, weight, bias):
        c = self.case
        kwargs = {"bias": bias, "shift": c["shift"], **self.reference_kwargs(), **self.extra}
        if c["method"] not in UNPAIRED:
            return module(hidden, weight, self.labels, **kwargs)
        if c["kl_given"]:
            kwargs["kl"] = 0.25
        else:
            kl_ref = self.reference_kwargs("kl_")
            if c["reference"] == "hidden":
                kl_ref = {"ref_kl_hidden": self.ref_kl_hidden}
            kwargs.update(kl_hidden=self.kl_hidden, kl_labels=self.kl_labels, **kl_ref)
        if c["method"] == "factalign":
            kwargs.update(sentence_ids=self.sentence_ids, sentence_labels=self.sentence_labels)
            if c["kl_sentences"] and not c["kl_given"]:
                kwargs["kl_sentence_ids"] = self.kl_sentence_ids
            else:
                kwargs["fg_kl"] = 0.1
        return module(hidden, weight, self.labels, self.desirable, **kwargs)

    # ------------------------------------------------------------------------------------------- float64
    def tokens64(self, hidden, weight, bias, labels):
        c = self.case
        return naive_linear_logprobs(
            hidden.double(), weight.double(), labels.long(), None if bias is None else bias.double(),
            ignore_index=c["ignore_index"], shift=c["shift"], temperature=c["temperature"], softcap=c["softcap"],
        )  # fmt: skip

    def ref_tokens64(self, kl: bool = False):
        c = self.case
        if c["reference"] == "hidden":
            hidden = self.ref_kl_hidden if kl else self.ref_hidden
            return self.tokens64(
                hidden, self.ref_weight, self.ref_bias, self.kl_labels if kl else self.labels
            )
        return (self.ref_kl_tokens if kl else self.ref_tokens).double()

    def reference_loss(self, module, hidden, weight, bias):
        """The float64 loss on float64 leaves (``module`` only for its hyper-parameters)."""
        c = self.case
        tok = self.tokens64(hidden, weight, bias, self.labels)
        self.tok64 = tok  # the float64 per-token log-probs the loss is built on (for the error floors)
        mask = self.mask
        sums, lengths = tok.sum(-1), mask.sum(-1).double()
        b = c["rows"] // 2
        method = c["method"]
        ref = None if method in REFERENCE_FREE else self.ref_tokens64()
        if method == "dpo":
            rs = ref.sum(-1)
            loss, _ = naive_dpo(
                sums[:b], sums[b:], rs[:b], rs[b:], lengths[:b].clamp(min=1), lengths[b:].clamp(min=1),
                beta=module.beta, loss_type=module.loss_type, eps=module.label_smoothing,
            )  # fmt: skip
            nll = -sums[:b].sum() / lengths[:b].sum().clamp(min=1)
            return loss + module.nll_weight * nll
        if method == "sampo":
            kept = PF.sampo_sample_masks(
                mask[:b], mask[b:], generator=torch.Generator().manual_seed(c["seed"])
            )
            kept = torch.cat(kept)
            ps, rs = (tok * kept).sum(-1), (ref * kept).sum(-1)
            loss, _ = naive_dpo(
                ps[:b], ps[b:], rs[:b], rs[b:], None, None, beta=module.beta, loss_type="sigmoid"
            )
            nll = -sums[:b].sum() / lengths[:b].sum().clamp(min=1)
            return loss + module.nll_weight * nll
        if method in ("sppo", "gpo"):
            rs = ref.sum(-1)
            fn = PF.sppo_loss if method == "sppo" else PF.gpo_loss
            kw = {} if method == "sppo" else {"clamp": module.clamp}
            first, second = self.extra.values()
            return fn(sums[:b], sums[b:], rs[:b], rs[b:], first, second, beta=module.beta, **kw).loss
        if method == "simpo":
            return PF.simpo_loss(
                sums[:b], sums[b:], lengths[:b], lengths[b:], beta=module.beta, gamma=module.gamma,
                label_smoothing=module.label_smoothing, nll_weight=module.nll_weight,
            ).loss  # fmt: skip
        if method == "orpo":
            return PF.orpo_loss(
                sums[:b], sums[b:], lengths[:b], lengths[b:], beta=module.beta, nll_weight=module.nll_weight
            ).loss
        if method == "cpo":
            return PF.cpo_loss(
                sums[:b], sums[b:], beta=module.beta, label_smoothing=module.label_smoothing,
                nll_weight=module.nll_weight, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                average_log_prob=module.average_log_prob,
            ).loss  # fmt: skip
        # KTO / FactAlign
        if c["kl_given"]:
            z = torch.tensor(0.25, dtype=torch.float64)
        else:
            with torch.no_grad():
                kl_tok = self.tokens64(self.kl_hidden, weight, bias, self.kl_labels)
            delta = kl_tok.sum(-1) - self.ref_tokens64(kl=True).sum(-1)
            z = delta.mean().clamp(min=0) if delta.numel() else torch.zeros((), dtype=torch.float64)
        if method == "kto":
            if c["rows"] == 0:
                return sums.sum()
            loss, _ = naive_kto(
                sums, ref.sum(-1), self.desirable, z, beta=module.beta, wd=module.desirable_weight,
                wu=module.undesirable_weight,
            )  # fmt: skip
            return loss
        aligned = (lambda ids: ids[:, 1:]) if c["shift"] else (lambda ids: ids)
        kl_kwargs = {"kl": 0.25, "fg_kl": 0.1} if c["kl_given"] else {}
        if not c["kl_given"]:
            kl_ref = self.ref_tokens64(kl=True)
            if c["kl_sentences"]:
                kl_kwargs = {"policy_kl_logps": kl_tok, "ref_kl_logps": kl_ref,
                             "kl_sentence_ids": aligned(self.kl_sentence_ids)}  # fmt: skip
            else:
                kl_kwargs = {"policy_kl_logps": kl_tok.sum(-1), "ref_kl_logps": kl_ref.sum(-1), "fg_kl": 0.1}
        return PF.factalign_loss(
            tok, ref, self.desirable, aligned(self.sentence_ids), self.sentence_labels, beta=module.beta,
            fg_beta=module.fg_beta, desirable_weight=module.desirable_weight,
            undesirable_weight=module.undesirable_weight, fg_desirable_weight=module.fg_desirable_weight,
            fg_undesirable_weight=module.fg_undesirable_weight, loss_weight=module.loss_weight,
            fg_loss_weight=module.fg_loss_weight, **kl_kwargs,
        ).loss  # fmt: skip


def check_loss(case):
    lc = LossCase(case)
    module = lc.module()
    dtype = case["dtype"]
    leaves = [lc.h_leaf.clone().requires_grad_(), lc.weight.clone().requires_grad_()]
    if lc.bias is not None:
        leaves.append(lc.bias.clone().requires_grad_())
    views = [lc.h_view(leaves[0]), leaves[1]] + leaves[2:]
    out = lc.call(module, views[0], views[1], views[2] if lc.bias is not None else None)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss), out.loss
    for key, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    grads = torch.autograd.grad(out.loss, views, allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, views)]
    for name, g, v in zip(("hidden", "weight", "bias"), grads, views):
        assert g.shape == v.shape and g.dtype == dtype and torch.isfinite(g).all(), name
    if case["rows"] == 0:  # an empty batch: a zero loss that still back-propagates (zero gradients)
        assert out.loss == 0 and all((g == 0).all() for g in grads)
        return
    # float64 reference on the (rounded) inputs; the DPO running mean of a fresh module is this batch's mean
    leaves64 = [v.detach().double().requires_grad_() for v in views]
    loss64 = lc.reference_loss(
        lc.module(), leaves64[0], leaves64[1], leaves64[2] if lc.bias is not None else None
    )
    *grads64, g_tok = torch.autograd.grad(loss64, [*leaves64, lc.tok64], allow_unused=True)
    grads64 = [torch.zeros_like(v) if g is None else g for g, v in zip(grads64, leaves64)]
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    assert close_normwise(out.loss, loss64.detach(), tol, 1.0), (float(out.loss), float(loss64))
    # Rounding is relative to one term of each gradient's sum, ``dL/dlogp * (onehot - softmax) * W / T`` and
    # alike, not to the result: a saturated softmax (1 - p ~ 1e-5) cancels to a tiny gradient whose fp32
    # relative error is large, for the naive computation as much as for the fused one.
    g_max = float(g_tok.abs().max()) / case["temperature"] if g_tok is not None and g_tok.numel() else 0.0
    h_max = float(leaves64[0].detach().abs().max()) if leaves64[0].numel() else 0.0
    floors = {
        "hidden": g_max * float(leaves64[1].detach().abs().max()),
        "weight": g_max * h_max,
        "bias": g_max,
    }
    for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
        gtol = tol if dtype == torch.float32 else 2 * grad_tol(dtype)
        assert close_normwise(g, g64, gtol, max(floors[name], 1e-6)), (name, rel_err(g, g64))


@budget(400)
@given(case=loss_cases())
def test_every_loss_property(case):
    check_loss(case)


@budget(150)
@given(case=loss_cases(method="dpo"))
def test_dpo_every_loss_type_property(case):
    check_loss(case)


@budget(120)
@given(case=loss_cases(method="factalign"))
def test_factalign_property(case):
    check_loss(case)


# ----------------------------------------------------------------------------------------------- empty, NaN
ALL_METHODS = PAIRED + UNPAIRED


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("reference", ["hidden", "per_token"])
def test_every_loss_accepts_an_empty_batch(method, reference):
    """0 rows (a data-parallel rank with no data, the last partial batch): loss 0.0, finite metrics, a graph
    that back-propagates zeros. KTO / FactAlign still take part in their reference point's all-reduce."""
    case = {
        "method": method, "rows": 0, "T": 5, "D": 4, "V": 7, "dtype": torch.float32, "bias": True,
        "shift": True, "ignore_index": -100, "layouts": [], "reference": reference, "int32": False,
        "hidden_layout": "contiguous", "temperature": 1.0, "softcap": None, "beta": 0.1, "nll_weight": 0.5,
        "loss_type": "bco_pair", "smoothing": False, "kl_rows": 0, "kl_given": False, "kl_sentences": True,
        "flag": False, "seed": 0,
    }  # fmt: skip
    check_loss(case)


def test_empty_batch_leaves_the_bco_pair_running_mean_alone():
    """An empty batch counts 0 in TRL's running mean (it used to turn the mean into NaN for good)."""
    full = LossCase(_base_loss_case("dpo"))
    empty = LossCase(dict(_base_loss_case("dpo"), rows=0, layouts=[]))
    module = DPOLoss(loss_type="bco_pair", backend="torch")
    args = (full.h_leaf, full.weight, full.labels)
    module(empty.h_leaf, empty.weight, empty.labels, ref_logps=empty.ref_tokens.sum(-1))
    after_empty = module(*args, ref_logps=full.ref_tokens.sum(-1))
    first = DPOLoss(loss_type="bco_pair", backend="torch")(*args, ref_logps=full.ref_tokens.sum(-1))
    assert torch.isfinite(module._bco_mean) and torch.equal(after_empty.loss, first.loss)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_finite_hidden_gives_a_nan_loss_not_an_exception(method):
    """A NaN/inf hidden state on a scored position makes that row's log-prob NaN, hence the loss NaN
    (documented: no exception and no host sync; check ``torch.isfinite(loss)`` to skip such a step)."""
    case = {
        "method": method, "rows": 4, "T": 6, "D": 4, "V": 7, "dtype": torch.float32, "bias": False,
        "shift": True, "ignore_index": -100, "layouts": [(1, 5, False)], "reference": "per_token", "int32": False,
        "hidden_layout": "contiguous", "temperature": 1.0, "softcap": 3.0, "beta": 0.1, "nll_weight": 0.0,
        "loss_type": "sigmoid", "smoothing": False, "kl_rows": 2, "kl_given": True, "kl_sentences": False,
        "flag": False, "seed": 0,
    }  # fmt: skip
    lc = LossCase(case)
    hidden = lc.h_leaf.clone()
    hidden[0, 2, 1] = math.inf  # row 0, position 2 predicts a completion token
    out = lc.call(lc.module(), hidden, lc.weight, None)
    assert out.loss.isnan()


# ----------------------------------------------------------------------------------------------- bad loss inputs
def _base_loss_case(method: str) -> dict:
    return {
        "method": method, "rows": 4, "T": 6, "D": 4, "V": 7, "dtype": torch.float32, "bias": False,
        "shift": True, "ignore_index": -100, "layouts": [(1, 4, False), (2, 2, True)], "reference": "per_token",
        "int32": False, "hidden_layout": "contiguous", "temperature": 1.0, "softcap": None, "beta": 0.1,
        "nll_weight": 0.0, "loss_type": "sigmoid", "smoothing": False, "kl_rows": 2, "kl_given": False,
        "kl_sentences": True, "flag": False, "seed": 0,
    }  # fmt: skip


def _call_with(lc: LossCase, **override):
    """Call the module with some arguments replaced (``None`` removes one)."""
    c = lc.case
    kwargs = {"bias": None, "shift": c["shift"], **lc.reference_kwargs(), **lc.extra}
    positional = {"hidden": lc.h_leaf, "weight": lc.weight, "labels": lc.labels}
    if c["method"] in UNPAIRED:
        positional["desirable"] = lc.desirable
        kwargs.update(kl_hidden=lc.kl_hidden, kl_labels=lc.kl_labels, **lc.reference_kwargs("kl_"))
        if c["method"] == "factalign":
            kwargs.update(sentence_ids=lc.sentence_ids, sentence_labels=lc.sentence_labels,
                          kl_sentence_ids=lc.kl_sentence_ids)  # fmt: skip
    for key, value in override.items():
        target = positional if key in positional else kwargs
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value(lc) if callable(value) else value
    return lc.module()(*positional.values(), **kwargs)


BAD_LOSS_INPUTS = {
    # name: (methods, overrides, message)
    "hidden 2-D": (
        ALL_METHODS,
        {"hidden": lambda lc: lc.h_leaf[0]},
        r"hidden must be a \(rows, T, D\) tensor",
    ),
    "hidden a list": (ALL_METHODS, {"hidden": [[[1.0]]]}, r"hidden must be a \(rows, T, D\) tensor"),
    "labels float": (
        ALL_METHODS,
        {"labels": lambda lc: lc.labels.float()},
        "labels must be an integer tensor",
    ),
    "labels wrong T": (ALL_METHODS, {"labels": lambda lc: lc.labels[:, :-1]}, "labels has shape"),
    "label = V": (ALL_METHODS, {"labels": lambda lc: lc.labels.clamp(min=0) + 7}, "targets holds"),
    "odd rows (paired)": (
        PAIRED,
        {"hidden": lambda lc: lc.h_leaf[:3], "labels": lambda lc: lc.labels[:3]},
        "a paired loss takes 2B rows",
    ),
    "weight wrong D": (ALL_METHODS, {"weight": lambda lc: lc.weight[:, :-1]}, "weight's D"),
    "weight float64": (ALL_METHODS, {"weight": lambda lc: lc.weight.double()}, "weight must have dtype"),
    "shift 1": (ALL_METHODS, {"shift": 1}, "shift must be a bool"),
    "no reference": (["dpo", "sampo", "sppo", "gpo", "kto"], {"ref_logps": None}, "needs a reference"),
    "ref_logps wrong shape": (
        ["dpo", "sampo", "kto", "factalign"],
        {"ref_logps": lambda lc: lc.ref_tokens[:, :-1]},
        "ref_logps must be",
    ),
    "ref_logps sums for SamPO": (
        ["sampo"],
        {"ref_logps": lambda lc: lc.ref_tokens.sum(-1)},
        "needs per-token ref_logps",
    ),
    "ref_logps int": (
        ["dpo"],
        {"ref_logps": lambda lc: lc.ref_tokens.long()},
        "ref_logps must be a floating",
    ),
    "ref_logps on meta": (
        ["dpo", "sampo", "kto"],
        {"ref_logps": lambda lc: lc.ref_tokens.to("meta")},
        "ref_logps is on meta",
    ),
    "ref_hidden without ref_weight": (
        ["dpo", "kto"],
        {"ref_logps": None, "ref_hidden": lambda lc: lc.ref_hidden},
        "needs ref_weight",
    ),
    "a reference for a reference-free loss": (
        list(REFERENCE_FREE),
        {"ref_logps": lambda lc: lc.ref_tokens},
        "reference-free",
    ),
    "p_chosen > 1": (
        ["sppo"],
        {"p_chosen": lambda lc: lc.extra["p_chosen"] + 2},
        "p_chosen must hold probab",
    ),
    "p_chosen NaN": (
        ["sppo"],
        {"p_chosen": lambda lc: lc.extra["p_chosen"] * math.nan},
        "p_chosen must hold",
    ),
    "p_chosen wrong length": (
        ["sppo"],
        {"p_chosen": lambda lc: lc.extra["p_chosen"][:1]},
        "p_chosen must have",
    ),
    "p_rejected on meta": (
        ["sppo"],
        {"p_rejected": lambda lc: lc.extra["p_rejected"].to("meta")},
        "p_rejected is on meta",
    ),
    "s_chosen missing": (["gpo"], {"s_chosen": None}, None),
    "desirable int": (UNPAIRED, {"desirable": lambda lc: lc.desirable.long()}, "desirable must be a bool"),
    "desirable wrong length": (
        UNPAIRED,
        {"desirable": lambda lc: lc.desirable[:1]},
        "desirable must have length",
    ),
    "desirable on meta": (
        UNPAIRED,
        {"desirable": lambda lc: lc.desirable.to("meta")},
        "desirable is on meta",
    ),
    "no KL rows and no kl": (["kto"], {"kl_hidden": None}, "needs its reference point"),
    "kl and KL rows": (["kto"], {"kl": 0.1}, "pass either kl or the KL rows"),
    "sentence id out of range": (
        ["factalign"],
        {"sentence_ids": lambda lc: lc.sentence_ids.clamp(min=0) + 99},
        "sentence_ids holds sentence id",
    ),
    "sentence id < -1": (
        ["factalign"],
        {"sentence_ids": lambda lc: lc.sentence_ids.clamp(max=-3)},
        "sentence_ids holds -3",
    ),
    "sentence_labels float": (
        ["factalign"],
        {"sentence_labels": lambda lc: lc.sentence_labels.float()},
        "sentence_labels must be a bool",
    ),
    "sentence_ids missing": (["factalign"], {"sentence_ids": None}, "needs sentence_ids and sentence_labels"),
    "sentence_labels on meta": (
        ["factalign"],
        {"sentence_labels": lambda lc: lc.sentence_labels.to("meta")},
        "sentence_labels is on meta",
    ),
}


def _bad_loss_params():
    for name, (methods, overrides, message) in BAD_LOSS_INPUTS.items():
        for method in methods:
            yield pytest.param(method, overrides, message, id=f"{name}-{method}")


@pytest.mark.parametrize("method, overrides, message", list(_bad_loss_params()))
def test_loss_bad_inputs_raise_value_error(method, overrides, message):
    lc = LossCase(_base_loss_case(method))
    if message is None:  # a missing required keyword argument: Python's own TypeError, as for any function
        with pytest.raises(TypeError, match="missing 1 required keyword-only argument"):
            _call_with(lc, **overrides)
        return
    with pytest.raises(ValueError, match=message):
        _call_with(lc, **overrides)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ALL_METHODS)
def test_loss_mixed_devices_raise_value_error(method):
    """Policy on CUDA, one user-supplied tensor left on the CPU: a ValueError naming it."""
    lc = LossCase(_base_loss_case(method))
    cuda = {"hidden": lc.h_leaf.cuda(), "weight": lc.weight.cuda(), "labels": lc.labels.cuda()}
    if method in UNPAIRED:
        cuda.update(kl_hidden=lc.kl_hidden.cuda(), kl_labels=lc.kl_labels.cuda(),
                    ref_kl_logps=lc.ref_kl_tokens.cuda())  # fmt: skip
        if method == "factalign":
            cuda.update(sentence_ids=lc.sentence_ids.cuda(), sentence_labels=lc.sentence_labels.cuda(),
                        kl_sentence_ids=lc.kl_sentence_ids.cuda())  # fmt: skip
        cuda["desirable"] = lc.desirable.cuda()
    for k, v in lc.extra.items():
        cuda[k] = v.cuda()
    if method not in REFERENCE_FREE:
        cuda["ref_logps"] = lc.ref_tokens  # left on the CPU
        expected = "ref_logps is on cpu"
    else:
        cuda["labels"] = lc.labels  # left on the CPU
        expected = "targets is on cpu"
    with pytest.raises(ValueError, match=expected):
        _call_with(lc, **cuda)
