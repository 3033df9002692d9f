"""Each workload written on top of a per-token log-prob provider (``benchmarks.providers``).

With the naive provider these are the "naive PyTorch" contenders (full logits, ``log_softmax``, gather, then
the loss — what a TRL-style trainer does); with Cut Cross-Entropy's provider they are how a CCE user would get
the loss; with the float64 provider they are the reference of the error column. They are written here from the
papers' and TRL's formulas, independently of ``prefuse.alignment``, so the error column also checks
prefuse's losses. Hyper-parameters are the modules' defaults.

Sequence log-probs are sums over completion tokens, taken before the policy - reference difference (TRL's
order, and prefuse's and Liger's: in float32 the sums of ~-3,000 cancel in the difference, which sets the loss
error to ~1e-5 at 512 tokens); the reference model runs under ``no_grad``; KTO's and FactAlign's reference
points come from the KL rows, detached and clamped at 0. Sums are accumulated in float32 (float64 for the
reference) whatever the provider's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.inputs import IGNORE_INDEX, Batch
from benchmarks.providers import LogpsProvider

BETA = 0.1
SPPO_BETA = 0.001
FG_BETA = 0.1
FG_UNDESIRABLE_WEIGHT = 4.0


def _acc(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _policy_and_ref(batch: Batch, provider: LogpsProvider) -> tuple[Tensor, Tensor]:
    """Per-token policy log-probs (with autograd) and reference log-probs (no grad), accumulation dtype."""
    policy = _acc(provider(batch.hidden, batch.weight, batch.labels, batch.softcap))
    with torch.no_grad():
        ref = _acc(provider(batch.ref_hidden, batch.ref_weight, batch.labels, batch.softcap))
    return policy, ref


def _kl_rows(batch: Batch, provider: LogpsProvider) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the mismatched KL rows under the policy head and the reference head, no grad."""
    with torch.no_grad():
        policy = _acc(provider(batch.kl_hidden, batch.weight, batch.kl_labels, batch.softcap))
        ref = _acc(provider(batch.ref_kl_hidden, batch.ref_weight, batch.kl_labels, batch.softcap))
    return policy, ref


def _kto_terms(delta: Tensor, desirable: Tensor, z: Tensor, beta: float, weight_u: float = 1.0) -> Tensor:
    """``1 - σ(β(Δ - z))`` for desirable items, ``λU (1 - σ(β(z - Δ)))`` for undesirable ones."""
    gain = 1 - torch.sigmoid(beta * (delta - z))
    return torch.where(desirable, gain, weight_u * (1 - torch.sigmoid(beta * (z - delta))))


def logprobs(batch: Batch, provider: LogpsProvider) -> Tensor:
    """The core op: per-token log-probs ``(rows, T-1)`` of the policy head."""
    return provider(batch.hidden, batch.weight, batch.labels, batch.softcap)


def dpo(batch: Batch, provider: LogpsProvider) -> Tensor:
    """DPO (sigmoid): ``mean_b -logσ(β(Δc - Δr))``."""
    policy, ref = _policy_and_ref(batch, provider)
    delta = policy.sum(-1) - ref.sum(-1)
    b = delta.shape[0] // 2
    return -F.logsigmoid(BETA * (delta[:b] - delta[b:])).mean()


def sampo_kept(batch: Batch) -> Tensor:
    """SamPO's kept completion tokens ``(rows, T-1)``: the sample ``SamPOLoss(seed=batch.seed)`` draws first
    (same sampler and generator), so every contender scores the same tokens."""
    from prefuse.alignment.functional import sampo_sample_masks

    mask = batch.labels[:, 1:] != IGNORE_INDEX
    b = mask.shape[0] // 2
    gen = torch.Generator(device=mask.device)
    gen.manual_seed(batch.seed)
    return torch.cat(sampo_sample_masks(mask[:b], mask[b:], generator=gen))


def sampo(batch: Batch, provider: LogpsProvider) -> Tensor:
    """SamPO: DPO on the log-ratios summed over a shared down-sample of the longer completion."""
    kept = sampo_kept(batch)
    policy, ref = _policy_and_ref(batch, provider)
    delta = torch.where(kept, policy, 0.0).sum(-1) - torch.where(kept, ref, 0.0).sum(-1)
    b = delta.shape[0] // 2
    return -F.logsigmoid(BETA * (delta[:b] - delta[b:])).mean()


def kto(batch: Batch, provider: LogpsProvider) -> Tensor:
    """KTO with the KL rows' reference point ``z = max(0, mean Δ_KL)``; mean over the examples."""
    policy, ref = _policy_and_ref(batch, provider)
    delta = policy.sum(-1) - ref.sum(-1)
    kl_policy, kl_ref = _kl_rows(batch, provider)
    z = (kl_policy.sum(-1) - kl_ref.sum(-1)).mean().clamp(min=0)
    return _kto_terms(delta, batch.desirable, z, BETA).mean()


def factalign(batch: Batch, provider: LogpsProvider) -> Tensor:
    """FactAlign (fKTO): response-level KTO + sentence-level KTO on per-sentence log-ratio sums, each sentence
    scored on its own tokens, ``z_fg = max(0, mean over the KL rows' sentences)``, λU = 4 for sentences."""
    policy, ref = _policy_and_ref(batch, provider)
    kl_policy, kl_ref = _kl_rows(batch, provider)
    z = (kl_policy.sum(-1) - kl_ref.sum(-1)).mean().clamp(min=0)
    response = _kto_terms(policy.sum(-1) - ref.sum(-1), batch.desirable, z, BETA).mean()

    ids = batch.sentence_ids[:, 1:]  # aligned with the shifted per-token output
    inside = ids >= 0
    n_sentences = batch.sentence_labels.shape[0]

    def sentence_sums(tok: Tensor) -> Tensor:
        return tok.new_zeros(n_sentences).index_add(0, ids[inside], tok[inside])

    sentence_delta = sentence_sums(policy) - sentence_sums(ref)
    kl_ids = batch.kl_sentence_ids[:, 1:]
    kl_inside = kl_ids >= 0
    kl_total = kl_policy[kl_inside].sum() - kl_ref[kl_inside].sum()
    z_fg = (kl_total / kl_ids[kl_inside].unique().numel()).clamp(min=0)
    fine = _kto_terms(sentence_delta, batch.sentence_labels, z_fg, FG_BETA, FG_UNDESIRABLE_WEIGHT).mean()
    return response + fine


def sppo(batch: Batch, provider: LogpsProvider) -> Tensor:
    """SPPO with soft win rates, ``η = 1/β``: ``mean_b ½[(Δw - η(pw - ½))² + (Δl - η(pl - ½))²]``."""
    policy, ref = _policy_and_ref(batch, provider)
    delta = policy.sum(-1) - ref.sum(-1)
    b = delta.shape[0] // 2
    eta = 1.0 / SPPO_BETA
    pw, pl = _acc(batch.p_chosen), _acc(batch.p_rejected)
    return (0.5 * ((delta[:b] - eta * (pw - 0.5)) ** 2 + (delta[b:] - eta * (pl - 0.5)) ** 2)).mean()


FORMULAS: dict[str, Callable[[Batch, LogpsProvider], Tensor]] = {
    "logprobs": logprobs,
    "dpo": dpo,
    "sampo": sampo,
    "kto": kto,
    "factalign": factalign,
    "sppo": sppo,
}
