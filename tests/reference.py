"""Naive float64 references for the tests (full logits, ``log_softmax``, autograd) and the helpers that
compare prefuse against them. Every test module imports its references from here, never from another test.

The loss references are written from the papers' / TRL's formulas independently of
``prefuse.alignment.functional``: full ``(rows, T, V)`` logits in float64, plain Python loops where that is
clearer. Paired references take ``2B`` rows, chosen ``[:B]`` then rejected ``[B:]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from prefuse.kernels.linear_logprobs import naive_linear_logprobs

# ---------------------------------------------------------------------------------------------- inputs and checks
IGNORE = -100


def make_labels(
    rows: int,
    T: int,
    V: int,
    gen: torch.Generator,
    *,
    min_prompt: int = 1,
    min_completion: int = 1,
    pad: bool = True,
) -> torch.Tensor:
    """Random HF-style labels: ``-100`` on a random-length prompt and on right padding."""
    labels = torch.randint(0, V, (rows, T), generator=gen)
    for r in range(rows):
        prompt = int(torch.randint(min_prompt, max(min_prompt + 1, T - min_completion), (1,), generator=gen))
        end = (
            T
            if not pad
            else int(torch.randint(min(T, prompt + 1 + min_completion), T + 1, (1,), generator=gen))
        )
        labels[r, :prompt] = IGNORE
        labels[r, end:] = IGNORE
    return labels


class Head:
    """Policy (or reference) inputs as float32 leaves for prefuse and float64 leaves for the reference."""

    def __init__(
        self,
        rows: int,
        T: int,
        D: int,
        V: int,
        gen: torch.Generator,
        *,
        bias: bool = True,
        scale: float = 1.0,
        grad: bool = True,
    ):
        h = torch.randn(rows, T, D, generator=gen) * scale
        w = torch.randn(V, D, generator=gen) / math.sqrt(D) * 2.0
        b = torch.randn(V, generator=gen) * 0.5 if bias else None
        self.h32 = h.clone().requires_grad_(grad)
        self.w32 = w.clone().requires_grad_(grad)
        self.b32 = b.clone().requires_grad_(grad) if bias else None
        self.h64 = h.double().requires_grad_(grad)
        self.w64 = w.double().requires_grad_(grad)
        self.b64 = b.double().requires_grad_(grad) if bias else None

    def leaves32(self):
        return [t for t in (self.h32, self.w32, self.b32) if t is not None]

    def leaves64(self):
        return [t for t in (self.h64, self.w64, self.b64) if t is not None]


def naive_token_logps(hidden, weight, bias, labels, *, shift: bool = True):
    """Per-token ``log p(label)`` in float64 from full logits; returns ``(logps (rows, L), mask (rows, L))``."""
    hidden, weight = hidden.double(), weight.double()
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias.double()
    logp = F.log_softmax(logits, dim=-1)
    mask = labels != IGNORE
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros((), dtype=tok.dtype)), mask


def head_token_logps(head: Head, labels):
    """``naive_token_logps`` of a ``Head``'s float64 leaves (the per-token log-probs only)."""
    return naive_token_logps(head.h64, head.w64, head.b64, labels)[0]


def naive_seq_logps(hidden, weight, bias, labels, *, shift: bool = True):
    """``(sums (rows,), lengths (rows,))`` in float64."""
    tok, mask = naive_token_logps(hidden, weight, bias, labels, shift=shift)
    return tok.sum(-1), mask.sum(-1).double()


def assert_loss_and_grads(loss32, loss64, head: Head, *, rtol: float = 2e-4, atol: float = 2e-5):
    """``loss32`` (prefuse, float32) and its gradients match the float64 reference."""
    torch.testing.assert_close(loss32.double(), loss64.detach(), rtol=rtol, atol=atol)
    grads32 = torch.autograd.grad(loss32, head.leaves32(), allow_unused=True)
    grads64 = torch.autograd.grad(loss64, head.leaves64(), allow_unused=True)
    for name, g32, g64 in zip(("hidden", "weight", "bias"), grads32, grads64):
        g32 = torch.zeros_like(g64) if g32 is None else g32.double()
        g64 = torch.zeros_like(g32) if g64 is None else g64
        scale = g64.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(
            g32 / scale, g64 / scale, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def assert_metrics(metrics: dict, expected: dict, *, rtol: float = 2e-4, atol: float = 2e-5):
    """Names are exactly ``expected``'s keys; each value matches and is detached, 0-d."""
    assert set(metrics) == set(expected), (sorted(metrics), sorted(expected))
    for key, value in expected.items():
        got = metrics[key]
        assert isinstance(got, torch.Tensor) and got.dim() == 0 and not got.requires_grad, key
        torch.testing.assert_close(
            got.double(),
            torch.as_tensor(value, dtype=torch.float64),
            rtol=rtol,
            atol=atol,
            msg=lambda m, key=key: f"metric {key}: {m}",
        )


PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def naive_pair_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).double().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def logsig(x):
    """``log σ(x) = -log(1 + e^{-x})``, written out (stable on both sides; each branch's ``exp`` argument is
    clamped to <= 0, so the unused branch cannot overflow and poison the gradient with inf * 0)."""
    return -torch.where(
        x >= 0, torch.log1p(torch.exp(-x.clamp(min=0))), -x + torch.log1p(torch.exp(x.clamp(max=0)))
    )


# ---------------------------------------------------------------------------------------------- the op
OP_IMPLS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("chunked", "cpu"), marks=pytest.mark.interpret, id="chunked-interpret"),
    pytest.param(("triton", "cpu"), marks=pytest.mark.interpret, id="triton-interpret"),
    pytest.param(("torch", "cuda"), marks=pytest.mark.gpu, id="torch-cuda"),
    pytest.param(("chunked", "cuda"), marks=pytest.mark.gpu, id="chunked-cuda"),
    pytest.param(("triton", "cuda"), marks=pytest.mark.gpu, id="triton-cuda"),
]
"""Every backend of the op on every device, as (backend, device) test parameters."""


def tiny_config_kwargs(tokenizer) -> dict:
    """The shared config fields of the tests' tiny causal LMs (2 layers, hidden 32) for ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def rel_err(actual, expected):
    """Normwise relative error: max |actual - expected| / max |expected|."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected).abs().max() / scale).item()


def grad_tol(dtype):
    """fp32: 1e-4. Half precision: two roundings of the dtype on top of fp32 accumulation (the logit gradient
    is cast to the input dtype to feed the tensor cores, and the gradient is returned in the input dtype)."""
    return 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def op_reference(hidden, weight, targets, bias, grad_out, **opts):
    """float64 values and gradients (of ``sum(grad_out * logp)``) from the naive full-logits computation."""
    leaves = [
        x.detach().double().cpu().requires_grad_()
        for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    out = naive_linear_logprobs(
        leaves[0], leaves[1], targets.cpu(), leaves[2] if bias is not None else None, **opts
    )
    grads = torch.autograd.grad((out * grad_out.double().cpu()).sum(), leaves)
    return out, grads


# ---------------------------------------------------------------------------------------------- DPO
SMOOTHING = {"sigmoid": 0.1, "robust": 0.1, "exo_pair": 0.05}


def naive_dpo(pc, pr, rc, rr, lc, lr, *, beta, loss_type, eps=0.0, tau=0.05, delta=None):
    """TRL's per-pair DPO losses in float64, written out formula by formula."""
    sig = torch.sigmoid
    dc, dr = pc - rc, pr - rr
    x = beta * (dc - dr)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * logsig(x) - eps * logsig(-x)
    elif loss_type == "ipo":  # TRL: the loss on per-token averages (its metrics stay on the sums)
        losses = ((dc / lc - dr / lr) - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.clamp(1 - x, min=0)
    elif loss_type == "robust":
        losses = ((1 - eps) * -logsig(x) - eps * -logsig(-x)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        losses = sig(x) * (logsig(x) - math.log(1 - eps)) + sig(-x) * (logsig(-x) - math.log(eps))
    elif loss_type == "nca_pair":
        losses = -logsig(beta * dc) - 0.5 * logsig(-beta * dc) - 0.5 * logsig(-beta * dr)
    elif loss_type == "bco_pair":
        if delta is None:
            delta = torch.cat([beta * dc, beta * dr]).mean().detach()
        losses = -logsig(beta * dc - delta) - logsig(-(beta * dr - delta))
    elif loss_type == "sppo_hard":
        losses = (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - sig(beta * dc)) + sig(beta * dr)
    elif loss_type == "apo_down":
        losses = sig(beta * dc) + (1 - sig(x))
    elif loss_type == "discopop":
        m = sig(x / tau)
        losses = -logsig(x) * (1 - m) + torch.exp(-x) * m
    elif loss_type == "sigmoid_norm":
        losses = -logsig(beta * (dc / lc - dr / lr))
    else:
        raise AssertionError(loss_type)
    return losses.mean(), (pc, pr, beta * dc, beta * dr)


# ---------------------------------------------------------------------------------------------- KTO
KTO_METRICS = {
    "kl",
    "count/chosen",
    "count/rejected",
    "rewards/chosen_sum",
    "rewards/rejected_sum",
    "logps/chosen_sum",
    "logps/rejected_sum",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


def naive_kto(p, r, desirable, z, *, beta, wd=1.0, wu=1.0):
    """TRL / HALOs KTO in float64: mean over rows of the class-weighted sigmoid losses."""
    d = p - r
    losses = []
    for i in range(d.shape[0]):
        if desirable[i]:
            losses.append(wd * (1 - torch.sigmoid(beta * (d[i] - z))))
        else:
            losses.append(wu * (1 - torch.sigmoid(beta * (z - d[i]))))
    loss = torch.stack(losses).mean()
    rewards = (beta * d).detach()
    ch, rj = desirable, ~desirable
    nc, nr = int(ch.sum()), int(rj.sum())
    metrics = {
        "kl": z,
        "count/chosen": nc,
        "count/rejected": nr,
        "rewards/chosen_sum": rewards[ch].sum(),
        "rewards/rejected_sum": rewards[rj].sum(),
        "logps/chosen_sum": p.detach()[ch].sum(),
        "logps/rejected_sum": p.detach()[rj].sum(),
        "rewards/chosen": rewards[ch].sum() / max(nc, 1),
        "rewards/rejected": rewards[rj].sum() / max(nr, 1),
        "logps/chosen": p.detach()[ch].sum() / max(nc, 1),
        "logps/rejected": p.detach()[rj].sum() / max(nr, 1),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


# ---------------------------------------------------------------------------------------------- FactAlign
def make_sentences(labels: torch.Tensor, gen: torch.Generator, *, skip: float = 0.2):
    """Split each row's completion (labels != -100) into consecutive sentences of 1-4 tokens, numbered over
    the batch; a few tokens stay outside every sentence (-1). Returns (sentence_ids aligned with labels, S)."""
    ids = torch.full_like(labels, -1)
    next_id = 0
    for r in range(labels.shape[0]):
        positions = torch.nonzero(labels[r] != IGNORE).flatten().tolist()
        i = 0
        while i < len(positions):
            length = int(torch.randint(1, 5, (1,), generator=gen))
            if float(torch.rand(1, generator=gen)) >= skip:
                for p in positions[i : i + length]:
                    ids[r, p] = next_id
                next_id += 1
            i += length
    return ids, next_id


def naive_factalign(
    b,
    *,
    beta=0.1,
    fg_beta=0.1,
    wd=1.0,
    wu=1.0,
    fwd=1.0,
    fwu=4.0,
    lw=1.0,
    fgw=1.0,
    use_kl_sentences=True,
):
    """FactAlign in float64 with per-sentence loops; ``b`` holds the batch (``policy`` / ``ref`` heads,
    ``labels``, the KL rows, ``desirable``, sentence ids and labels, as ``test_losses_factalign.Batch``)."""
    tok, _ = naive_token_logps(b.policy.h64, b.policy.w64, b.policy.b64, b.labels)
    rtok, _ = naive_token_logps(b.ref.h64, b.ref.w64, b.ref.b64, b.labels)
    ktok, _ = naive_token_logps(b.kl_hidden, b.policy.w64, b.policy.b64, b.kl_labels)
    krtok, _ = naive_token_logps(b.ref_kl_hidden, b.ref.w64, b.ref.b64, b.kl_labels)
    ktok = ktok.detach()
    # Response level.
    z = torch.clamp((ktok.sum(-1) - krtok.sum(-1)).mean(), min=0)
    kto, metrics = naive_kto(tok.sum(-1), rtok.sum(-1), b.desirable, z, beta=beta, wd=wd, wu=wu)
    # Sentence level: each sentence's own tokens; label position t+1 is output position t.
    sid = b.sentence_ids[:, 1:]
    S = b.num_sentences
    pol_s = torch.stack([tok[sid == s].sum() for s in range(S)]) if S else torch.zeros(0, dtype=torch.float64)
    ref_s = (
        torch.stack([rtok[sid == s].sum() for s in range(S)]) if S else torch.zeros(0, dtype=torch.float64)
    )
    z_fg = torch.zeros((), dtype=torch.float64)
    if use_kl_sentences:
        ksid = b.kl_sentence_ids[:, 1:]
        kl_ids = sorted(set(b.kl_sentence_ids[b.kl_sentence_ids >= 0].tolist()))
        kl_pol = torch.stack([ktok[ksid == s].sum() for s in kl_ids])
        kl_ref = torch.stack([krtok[ksid == s].sum() for s in kl_ids])
        z_fg = torch.clamp((kl_pol - kl_ref).mean(), min=0)
        metrics["fg_logps/policy_KL"] = kl_pol.mean()
        metrics["fg_logps/reference_KL"] = kl_ref.mean()
    d_s = pol_s - ref_s
    terms = [
        fwd * (1 - torch.sigmoid(fg_beta * (d_s[s] - z_fg)))
        if b.sentence_labels[s]
        else fwu * (1 - torch.sigmoid(fg_beta * (z_fg - d_s[s])))
        for s in range(S)
    ]
    fg = torch.stack(terms).mean() if S else torch.zeros((), dtype=torch.float64)
    sup, uns = b.sentence_labels, ~b.sentence_labels
    metrics.update(
        {
            "fg_kl": z_fg,
            "fg_loss": fg.detach(),
            "fg_rewards/chosen_sum": (fg_beta * d_s.detach())[sup].sum(),
            "fg_rewards/rejected_sum": (fg_beta * d_s.detach())[uns].sum(),
            "count/fg_chosen": int(sup.sum()),
            "count/fg_rejected": int(uns.sum()),
            "fg_logps/policy_chosen": pol_s.detach()[sup].sum() / max(int(sup.sum()), 1),
            "fg_logps/reference_chosen": ref_s.detach()[sup].sum() / max(int(sup.sum()), 1),
            "fg_logps/policy_rejected": pol_s.detach()[uns].sum() / max(int(uns.sum()), 1),
            "fg_logps/reference_rejected": ref_s.detach()[uns].sum() / max(int(uns.sum()), 1),
        }
    )
    return lw * kto + fgw * fg, metrics


# ---------------------------------------------------------------------------------------------- SPPO / GPO
def naive_square(tok, ref_tok, target_c, target_r, beta):
    """½[(Δw - target_w)² + (Δl - target_l)²], mean over pairs, from per-token log-probs ``(2B, L)``."""
    b = tok.shape[0] // 2
    p, r = tok.sum(-1), ref_tok.sum(-1)
    dc, dr = p[:b] - r[:b], p[b:] - r[b:]
    loss = (0.5 * ((dc - target_c) ** 2 + (dr - target_r) ** 2)).mean()
    return loss, naive_pair_metrics(p[:b], p[b:], beta * dc, beta * dr)


# ---------------------------------------------------------------------------------------------- SamPO
def naive_sampo(tok, ref_tok, kept_c, kept_r, *, beta):
    """SamPO from per-token log-probs ``(2B, L)`` on the given kept positions (shared by policy and
    reference)."""
    b = tok.shape[0] // 2
    kept = torch.cat([kept_c, kept_r])
    p = (tok * kept).sum(-1)
    r = (ref_tok * kept).sum(-1)
    dc, dr = p[:b] - r[:b], p[b:] - r[b:]
    loss = -logsig(beta * (dc - dr)).mean()
    return loss, naive_pair_metrics(p[:b], p[b:], beta * dc, beta * dr)


# ---------------------------------------------------------------------------------------------- SimPO / ORPO / CPO
def naive_parts(tok, mask):
    """``(sums (2B,), lengths (2B,), chosen-token NLL)`` of per-token log-probs and their mask."""
    b = tok.shape[0] // 2
    sums, lengths = tok.sum(-1), mask.sum(-1).double()
    nll = -tok[:b].sum() / mask[:b].sum()
    return sums, lengths, nll


def naive_simpo(tok, mask, *, beta, gamma, eps, nll_weight):
    sums, lengths, nll = naive_parts(tok, mask)
    b = tok.shape[0] // 2
    avg = sums / lengths
    u = beta * (avg[:b] - avg[b:]) - gamma
    loss = (-(1 - eps) * logsig(u) - eps * logsig(-u)).mean() + nll_weight * nll
    metrics = naive_pair_metrics(avg[:b], avg[b:], beta * avg[:b], beta * avg[b:])
    metrics["nll_loss"] = nll
    return loss, metrics


def naive_orpo(tok, mask, *, beta, nll_weight):
    sums, lengths, nll = naive_parts(tok, mask)
    b = tok.shape[0] // 2
    avg = sums / lengths
    c, r = avg[:b], avg[b:]
    log_odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
    ratio = logsig(log_odds)
    loss = nll_weight * nll - beta * ratio.mean()
    metrics = naive_pair_metrics(c, r, beta * c, beta * r)
    metrics.update({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
    return loss, metrics


def naive_cpo(tok, mask, *, beta, eps, nll_weight, average=False):
    sums, lengths, nll = naive_parts(tok, mask)
    b = tok.shape[0] // 2
    lp = sums / lengths if average else sums
    u = beta * (lp[:b] - lp[b:])
    loss = (-(1 - eps) * logsig(u) - eps * logsig(-u)).mean() + nll_weight * nll
    metrics = naive_pair_metrics(lp[:b], lp[b:], beta * lp[:b], beta * lp[b:])
    metrics["nll_loss"] = nll
    return loss, metrics
