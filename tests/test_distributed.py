"""Two ``torch.distributed`` ranks on gloo (CPU processes): data parallel statistics and the vocab-parallel head.

Every test launches 2 spawned processes through :func:`run_ranks` (a file store in a temporary folder, so no port
is reserved and none can be taken by someone else; a 60 s gloo timeout on every collective and a wall-clock limit on
the whole launch, so a hang fails the test instead of blocking CI). The ranks save their results; the parent
process computes the single-process answer and compares.

Gradient convention for data parallel (what DDP does): every rank back-propagates its own loss, and DDP *averages*
the parameter gradients over the ``W`` ranks. So the 2-rank run is the objective ``(1/W) Σ_r loss_r``: we check
``(1/W) Σ_r loss_r == loss(whole batch)``, ``(1/W) Σ_r ∇_W loss_r == ∇_W loss(whole batch)`` for the head, and
``(1/W) ∇_h loss_r == ∇_h loss(whole batch)`` on rank ``r``'s rows of the hidden states. With equal per-rank
batches the per-rank means then average to the whole-batch mean; the statistics (KTO's ``kl``, FactAlign's
``fg_kl``) are all-reduced count-weighted, so they equal the whole-batch statistic even when the KL rows are split
unevenly (tested: 2 and 4 KL rows).
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from prefuse.alignment import DPOLoss, FactAlignLoss, KTOLoss, SamPOLoss
from prefuse.alignment import functional as PF
from prefuse.kernels import linear_logprobs, vocab_parallel_linear_logprobs
from ranks import WORLD, run_ranks
from reference import IGNORE, grad_tol, rel_err
from reference import op_reference as reference

pytestmark = pytest.mark.slow  # spawns gloo ranks: CI runs it, `-m "not slow"` skips it


def _close(actual, expected, *, rtol=1e-5, atol=1e-6, what=""):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


# ----------------------------------------------------------------------------------------------- KTO, FactAlign
N, T, D, V = 8, 9, 12, 29  # N rows: rank r gets rows [r*N/2, (r+1)*N/2)
N_KL, T_KL = 6, 8
KL_SPLIT = (0, 2, 6)  # rank 0: KL rows 0-1, rank 1: KL rows 2-5 (uneven: the mean must be count-weighted)
SENTENCE_LENGTHS = (2, 3, 1)


def _sentences(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Consecutive sentences of 2, 3, 1, 2, ... completion tokens per row, numbered ``0..S-1`` over the rows;
    every other sentence's first token is left outside (-1)."""
    ids = torch.full_like(labels, -1)
    count = 0
    for r in range(labels.shape[0]):
        positions = torch.nonzero(labels[r] != IGNORE).flatten().tolist()
        i, k = 0, 0
        while i < len(positions):
            length = SENTENCE_LENGTHS[k % len(SENTENCE_LENGTHS)]
            chunk = positions[i : i + length]
            for p in chunk[(k % 2) if len(chunk) > 1 else 0 :]:
                ids[r, p] = count
            count, i, k = count + 1, i + length, k + 1
    return ids, count


def _half_labels(gen, rows, steps, prompts):
    labels = torch.randint(0, V, (rows, steps), generator=gen)
    for r, p in enumerate(prompts):
        labels[r, :p] = IGNORE
    return labels


def kto_data(seed: int = 0) -> dict:
    """The whole batch. Both halves have the same label layout (so the same sentence count per half), different
    tokens; the KL reference log-probs are the policy's minus known positive offsets (so ``kl`` > 0 is a real,
    unclamped mean, and its per-rank means differ from the global one)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [1, 3, 2, 5]
    labels = torch.cat([_half_labels(gen, N // 2, T, prompts) for _ in range(2)])
    kl_labels = _half_labels(gen, N_KL, T_KL, [1, 2, 1, 3, 2, 4])
    d = {
        "hidden": torch.randn(N, T, D, generator=gen),
        "weight": torch.randn(V, D, generator=gen) / math.sqrt(D) * 2,
        "bias": torch.randn(V, generator=gen) * 0.3,
        "labels": labels,
        "desirable": torch.tensor([True, False, True, True, False, True, False, False]),
        "ref_hidden": torch.randn(N, T, D, generator=gen),
        "ref_weight": torch.randn(V, D, generator=gen) / math.sqrt(D) * 2,
        "ref_bias": torch.randn(V, generator=gen) * 0.3,
        "kl_hidden": torch.randn(N_KL, T_KL, D, generator=gen),
        "kl_labels": kl_labels,
    }
    kl_policy = linear_logprobs(d["kl_hidden"], d["weight"], kl_labels, d["bias"], shift=True)
    d["ref_kl_logps"] = kl_policy - 0.4 * (kl_labels[:, 1:] != IGNORE) * torch.arange(1, N_KL + 1)[:, None]
    half_ids, s_half = _sentences(labels[: N // 2])
    d["sentence_ids"] = torch.cat([half_ids, torch.where(half_ids >= 0, half_ids + s_half, -1)])
    d["sentence_labels"] = torch.rand(2 * s_half, generator=gen) < 0.5
    d["s_half"] = s_half
    kl_ids = [_sentences(kl_labels[a:b]) for a, b in itertools.pairwise(KL_SPLIT)]
    d["kl_sentence_ids"] = torch.cat(
        [kl_ids[0][0], torch.where(kl_ids[1][0] >= 0, kl_ids[1][0] + kl_ids[0][1], -1)]
    )
    return d


def kto_slice(d: dict, rank: int | None) -> dict:
    """Rank ``rank``'s share (sentence ids renumbered from 0 on each rank); ``None``: the whole batch."""
    if rank is None:
        return dict(d)
    rows = slice(rank * N // 2, (rank + 1) * N // 2)
    kl = slice(KL_SPLIT[rank], KL_SPLIT[rank + 1])
    s = d["s_half"]
    out = {k: d[k][rows] for k in ("hidden", "labels", "desirable", "ref_hidden", "sentence_ids")}
    out.update({k: d[k][kl] for k in ("kl_hidden", "kl_labels", "ref_kl_logps", "kl_sentence_ids")})
    out.update({k: d[k] for k in ("weight", "bias", "ref_weight", "ref_bias")})
    out["sentence_ids"] = torch.where(out["sentence_ids"] >= 0, out["sentence_ids"] - rank * s, -1)
    out["sentence_labels"] = d["sentence_labels"][rank * s : (rank + 1) * s]
    if rank == 1:
        first = int(d["kl_sentence_ids"][KL_SPLIT[0] : KL_SPLIT[1]].max()) + 1
        out["kl_sentence_ids"] = torch.where(out["kl_sentence_ids"] >= 0, out["kl_sentence_ids"] - first, -1)
    return out


def kto_run(d: dict) -> dict:
    """KTOLoss and FactAlignLoss on ``d``: losses, the reference points and the gradients."""
    results = {}
    for name, module in (
        ("kto", KTOLoss(beta=0.3, desirable_weight=1.2, backend="torch")),
        ("factalign", FactAlignLoss(beta=0.3, fg_beta=0.5, backend="torch")),
    ):
        leaves = [d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        kwargs = {"bias": leaves[2]}
        kwargs.update(
            {
                k: d[k]
                for k in ("kl_hidden", "kl_labels", "ref_hidden", "ref_weight", "ref_bias", "ref_kl_logps")
            }
        )
        if name == "factalign":
            kwargs.update(
                sentence_ids=d["sentence_ids"],
                sentence_labels=d["sentence_labels"],
                kl_sentence_ids=d["kl_sentence_ids"],
            )
        out = module(leaves[0], leaves[1], d["labels"], d["desirable"], **kwargs)
        grads = torch.autograd.grad(out.loss, leaves)
        results[name] = {"loss": out.loss.detach(), "metrics": out.metrics, "grads": grads}
    return results


def _kto_worker(rank: int, world: int) -> dict:
    return kto_run(kto_slice(kto_data(), rank))


def test_kto_and_factalign_reference_points_loss_and_grads_match_one_rank():
    whole = kto_run(kto_data())
    ranks = run_ranks(_kto_worker)
    d = kto_data()
    # the statistic is a real test of the all-reduce: positive, and not the mean of the two rank means
    offsets = 0.4 * (d["kl_labels"][:, 1:] != IGNORE).sum(-1) * torch.arange(1, N_KL + 1)
    assert whole["kto"]["metrics"]["kl"] > 0
    _close(whole["kto"]["metrics"]["kl"], offsets.mean(), rtol=1e-4, what="kl")
    assert abs(float(offsets[:2].mean() + offsets[2:].mean()) / 2 - float(offsets.mean())) > 0.5
    assert whole["factalign"]["metrics"]["fg_kl"] > 0
    for name, stats in (("kto", ("kl",)), ("factalign", ("kl", "fg_kl"))):
        for key in stats:
            for rank in range(WORLD):  # the same reference point on every rank, equal to the whole batch's
                _close(ranks[rank][name]["metrics"][key], whole[name]["metrics"][key], what=f"{name} {key}")
        _close(
            sum(r[name]["loss"] for r in ranks) / WORLD,
            whole[name]["loss"],
            what=f"{name} loss (DDP average)",
        )
        for i, leaf in ((1, "weight"), (2, "bias")):
            ddp = sum(r[name]["grads"][i] for r in ranks) / WORLD
            _close(ddp, whole[name]["grads"][i], what=f"{name} grad {leaf}")
        for rank in range(WORLD):
            rows = slice(rank * N // 2, (rank + 1) * N // 2)
            _close(
                ranks[rank][name]["grads"][0] / WORLD,
                whole[name]["grads"][0][rows],
                what=f"{name} grad hidden, rank {rank}",
            )


# ----------------------------------------------------------------------------------------------- DPO bco_pair
B_PAIRS, STEPS = 6, 2  # pairs of the whole batch; rank r gets pairs [r*B/2, (r+1)*B/2)


def dpo_data(step: int) -> dict:
    gen = torch.Generator().manual_seed(100 + step)
    rows = 2 * B_PAIRS
    labels = _half_labels(gen, rows, T, [1 + (r % 4) for r in range(rows)])
    return {
        "hidden": torch.randn(rows, T, D, generator=gen),
        "weight": torch.randn(V, D, generator=gen) / math.sqrt(D) * 2,
        "labels": labels,
        "ref_logps": torch.randn(rows, generator=gen) * 3 - 20,
    }


def pair_rows(rank: int | None, pairs: int) -> torch.Tensor:
    """Row indices of rank ``rank``'s pairs in paired layout (chosen rows, then their rejected rows)."""
    if rank is None:
        return torch.arange(2 * pairs)
    mine = torch.arange(rank * pairs // 2, (rank + 1) * pairs // 2)
    return torch.cat([mine, mine + pairs])


def dpo_run(rank: int | None) -> list:
    module = DPOLoss(beta=0.2, loss_type="bco_pair", backend="torch")
    results = []
    for step in range(STEPS):
        d = dpo_data(step)
        idx = pair_rows(rank, B_PAIRS)
        leaves = [d["hidden"][idx].clone().requires_grad_(), d["weight"].clone().requires_grad_()]
        out = module(leaves[0], leaves[1], d["labels"][idx], ref_logps=d["ref_logps"][idx])
        results.append({"loss": out.loss.detach(), "grads": torch.autograd.grad(out.loss, leaves)})
    return results


def _dpo_worker(rank: int, world: int) -> list:
    return dpo_run(rank)


# ----------------------------------------------------------------------------------------------- SamPO
SEED = 5
DRAWS = 400


def sampo_data() -> dict:
    gen = torch.Generator().manual_seed(7)
    rows = 2 * B_PAIRS
    labels = _half_labels(gen, rows, T, [1 + (r % 5) for r in range(rows)])
    for r in range(rows):  # some right padding, so the lengths differ within a pair
        labels[r, T - r % 3 :] = IGNORE
    return {
        "hidden": torch.randn(rows, T, D, generator=gen),
        "weight": torch.randn(V, D, generator=gen) / math.sqrt(D) * 2,
        "labels": labels,
        "ref_logps": torch.randn(rows, T - 1, generator=gen) - 3,
    }


def _sampo_worker(rank: int, world: int) -> dict:
    d = sampo_data()
    idx = pair_rows(rank, B_PAIRS)
    leaves = [d["hidden"][idx].clone().requires_grad_(), d["weight"].clone().requires_grad_()]
    module = SamPOLoss(beta=0.3, seed=SEED, backend="torch")
    out = module(leaves[0], leaves[1], d["labels"][idx], ref_logps=d["ref_logps"][idx])
    grads = torch.autograd.grad(out.loss, leaves)
    # the module's sample, reproduced from the documented per-rank seed
    mask = d["labels"][idx][:, 1:] != IGNORE
    b = idx.numel() // 2
    gen = torch.Generator().manual_seed(PF.rank_seed(SEED, rank))
    kept = PF.sampo_sample_masks(mask[:b], mask[b:], generator=gen)
    # the stream itself: one pair (5 chosen tokens, 2 rejected), identical on both ranks, drawn DRAWS times
    mc = torch.zeros(1, 8, dtype=torch.bool)
    mc[0, 2:7] = True
    mr = torch.zeros(1, 8, dtype=torch.bool)
    mr[0, 1:3] = True
    streams = []
    for _ in range(2):  # a fresh module twice: reproducible
        fresh = SamPOLoss(seed=SEED, backend="torch")
        gen = fresh.generator(torch.device("cpu"))
        streams.append(
            torch.stack([PF.sampo_sample_masks(mc, mr, generator=gen)[0][0] for _ in range(DRAWS)])
        )
    return {"loss": out.loss.detach(), "grads": grads, "kept": kept, "streams": streams}


def _sampo_whole(kept_by_rank: list) -> tuple:
    """The whole batch's SamPO loss and gradients on the union of the ranks' samples (one process)."""
    d = sampo_data()
    leaves = [d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()]
    policy = linear_logprobs(leaves[0], leaves[1], d["labels"], shift=True, backend="torch")
    mask = d["labels"][:, 1:] != IGNORE
    b = B_PAIRS
    kc = torch.cat([k[0] for k in kept_by_rank])
    kr = torch.cat([k[1] for k in kept_by_rank])
    ref = d["ref_logps"]
    out = PF.sampo_loss(
        policy[:b], policy[b:], ref[:b], ref[b:], mask[:b], mask[b:], beta=0.3, sampled_masks=(kc, kr)
    )
    return out.loss.detach(), torch.autograd.grad(out.loss, leaves)


def _ddp_matches(ranks: list, whole_loss, whole_grads, pairs: int, what: str) -> None:
    _close(sum(r["loss"] for r in ranks) / WORLD, whole_loss, what=f"{what} loss (DDP average)")
    _close(sum(r["grads"][1] for r in ranks) / WORLD, whole_grads[1], what=f"{what} grad weight")
    for rank, r in enumerate(ranks):
        _close(
            r["grads"][0] / WORLD, whole_grads[0][pair_rows(rank, pairs)], what=f"{what} grad hidden {rank}"
        )


def _dpo_sampo_workers(rank: int, world: int) -> dict:
    return {"dpo": _dpo_worker(rank, world), "sampo": _sampo_worker(rank, world)}


def test_bco_pair_running_mean_and_sampo_samples_across_ranks():
    ranks = run_ranks(_dpo_sampo_workers)

    # DPO bco_pair: TRL's running mean of the batch-mean reward, all-reduced: with equal per-rank batches the
    # 2-rank run equals the 1-rank run at every step (the running mean carries over).
    whole = dpo_run(None)
    for step in range(STEPS):
        _ddp_matches(
            [r["dpo"][step] for r in ranks], whole[step]["loss"], whole[step]["grads"], B_PAIRS, "bco"
        )

    # SamPO: each rank draws from rank_seed(seed, rank); given those samples there is no cross-rank statistic,
    # so the 2-rank loss/gradients equal the whole batch's on the union of the samples.
    sampo = [r["sampo"] for r in ranks]
    loss, grads = _sampo_whole([s["kept"] for s in sampo])
    _ddp_matches(sampo, loss, grads, B_PAIRS, "sampo")

    # the streams: reproducible, rank 0 = the single-process stream, rank 1 independent of rank 0
    for s in sampo:
        assert torch.equal(s["streams"][0], s["streams"][1]), "the same seed must give the same samples"
    single = SamPOLoss(seed=SEED, backend="torch").generator(torch.device("cpu"))
    mc, mr = torch.zeros(1, 8, dtype=torch.bool), torch.zeros(1, 8, dtype=torch.bool)
    mc[0, 2:7], mr[0, 1:3] = True, True
    first = torch.stack([PF.sampo_sample_masks(mc, mr, generator=single)[0][0] for _ in range(DRAWS)])
    assert torch.equal(sampo[0]["streams"][0], first), "rank 0 must draw what one process draws"
    a, b = sampo[0]["streams"][0], sampo[1]["streams"][0]
    assert (a.sum(-1) == 2).all() and (b.sum(-1) == 2).all()
    # C(5, 2) = 10 subsets: independent ranks agree on ~1/10 of the draws (a shared seed would agree on all)
    same = int((a == b).all(-1).sum())
    assert 15 <= same <= 70, same
    # the union over ranks is uniform per position: each of the 5 tokens kept with probability 2/5
    hits = torch.cat([a, b]).float().sum(0)
    assert hits[:2].sum() == 0 and hits[7:].sum() == 0
    expected = 2 * DRAWS * 0.4
    chi2 = float(((hits[2:7] - expected) ** 2 / expected).sum())
    assert chi2 < 18.5, chi2  # df = 4, P(chi2 > 18.5) < 1e-3


def test_rank_seed_is_the_seed_on_rank_0_and_distinct_elsewhere():
    assert PF.rank_seed(123, 0) == 123
    seeds = {PF.rank_seed(s, r) for s in range(50) for r in range(8)}
    assert len(seeds) == 400  # no (seed, rank) collides with another, unlike seed + rank
    assert all(0 <= PF.rank_seed(s, r) < 2**63 for s in (-1, 0, 2**64 - 1) for r in (1, 7))


# ----------------------------------------------------------------------------------------------- vocab parallel
VP_CASES = {
    # name: (shape, D, V, shard boundary (rank 0: [0, cut) unless reversed), dtype, options)
    "plain": ((3, 7), 16, 37, 20, torch.float32, {}),
    "bias-shift": ((2, 9), 16, 37, 9, torch.float32, {"bias": True, "shift": True}),
    "softcap-temperature": ((13,), 8, 23, 11, torch.float32, {"softcap": 2.5, "temperature": 0.7}),
    "reversed-shards": ((2, 5), 8, 19, 7, torch.float32, {"reversed": True, "bias": True}),
    "one-column-shard": ((2, 6), 8, 12, 1, torch.float32, {"ignore_index": 3}),
    "bf16": ((2, 8), 16, 40, 24, torch.bfloat16, {"bias": True, "shift": True}),
    "empty": ((0, 4), 8, 10, 5, torch.float32, {"shift": True}),
}


def vp_inputs(name: str):
    shape, dim, vocab, cut, dtype, opts = VP_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    hidden = torch.randn(*shape, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim) * 3).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if opts.get("bias") else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    ignore = opts.get("ignore_index", -100)
    if targets.numel():
        targets.view(-1)[::4] = ignore  # a few ignored positions
        targets.view(-1)[1] = 0  # targets on both sides of the cut
        targets.view(-1)[2] = vocab - 1
    grad = torch.randn(targets[..., 1:].shape if opts.get("shift") else shape, generator=gen)
    kwargs = {k: opts[k] for k in ("shift", "softcap", "temperature", "ignore_index") if k in opts}
    return hidden, weight, targets, bias, grad, kwargs, cut, opts.get("reversed", False)


def vp_shard(name: str, rank: int) -> tuple[int, int]:
    _, _, vocab, cut, _, opts = VP_CASES[name]
    ranges = [(0, cut), (cut, vocab)]
    return ranges[1 - rank] if opts.get("reversed") else ranges[rank]


def _vp_worker(rank: int, world: int, backend: str, names: list) -> dict:
    results = {}
    for name in names:
        hidden, weight, targets, bias, grad, kwargs, _, _ = vp_inputs(name)
        start, end = vp_shard(name, rank)
        leaves = [hidden.clone().requires_grad_(), weight[start:end].clone().requires_grad_()]
        if bias is not None:
            leaves.append(bias[start:end].clone().requires_grad_())
        out = vocab_parallel_linear_logprobs(
            leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, vocab_start=start,
            vocab_size=weight.shape[0], backend=backend, **kwargs,
        )  # fmt: skip
        results[name] = {"out": out.detach(), "grads": torch.autograd.grad((out * grad).sum(), leaves)}
    # an explicit process group (a new group over both ranks) gives the same numbers as the default group
    import torch.distributed as dist

    hidden, weight, targets, _, _, _, _, _ = vp_inputs("plain")
    start, end = vp_shard("plain", rank)
    results["plain-group"] = vocab_parallel_linear_logprobs(
        hidden, weight[start:end], targets, vocab_start=start, vocab_size=weight.shape[0], backend=backend,
        process_group=dist.new_group([0, 1]),
    )  # fmt: skip
    # a non-finite hidden state: NaN at its own positions on every rank, nothing else
    hidden, weight, targets, _, _, _, _, _ = vp_inputs("plain")
    hidden[1, 2, 0] = math.nan
    start, end = vp_shard("plain", rank)
    results["nan"] = vocab_parallel_linear_logprobs(
        hidden, weight[start:end], targets, vocab_start=start, vocab_size=weight.shape[0], backend=backend
    )
    # misconfigured groups: a ValueError on every rank (nobody left waiting in a collective)
    errors = {}
    bad = {
        "gap": (rank * 20, rank * 20 + 10, 30),  # [0, 10) and [20, 30)
        "overlap": (rank * 5, rank * 5 + 10, 15),  # [0, 10) and [5, 15)
        "short": (rank * 10, rank * 10 + 10, 25),  # [0, 20) of 25
    }
    for key, (start, end, vocab) in bad.items():
        try:
            vocab_parallel_linear_logprobs(
                hidden, torch.randn(end - start, hidden.shape[-1]), torch.zeros_like(targets),
                vocab_start=start, vocab_size=vocab, backend=backend,
            )  # fmt: skip
        except ValueError as err:
            errors[key] = str(err)
    start, end = vp_shard("plain", rank)
    try:  # targets of different shapes on the two ranks
        vocab_parallel_linear_logprobs(
            hidden[: rank + 1], weight[start:end], targets[: rank + 1], vocab_start=start,
            vocab_size=weight.shape[0], backend=backend,
        )  # fmt: skip
    except ValueError as err:
        errors["targets"] = str(err)
    results["errors"] = errors
    return results


def _check_vocab_parallel(ranks: list, names: list, backend: str) -> None:
    for name in names:
        hidden, weight, targets, bias, grad, kwargs, _, _ = vp_inputs(name)
        dtype = hidden.dtype
        full_out, full_grads = reference(hidden, weight, targets, bias, grad, **kwargs)  # float64, unsharded
        unsharded = linear_logprobs(hidden, weight, targets, bias, backend="torch", **kwargs)
        assert torch.equal(ranks[0][name]["out"], ranks[1][name]["out"]), f"{name}: ranks must agree bitwise"
        for rank, r in enumerate(ranks):
            out, grads = r[name]["out"], r[name]["grads"]
            assert out.shape == unsharded.shape and out.dtype == torch.float32
            if out.numel():
                assert rel_err(out, full_out) <= 1e-5, (name, rank)
                torch.testing.assert_close(out, unsharded, rtol=1e-5, atol=1e-5)
            start, end = vp_shard(name, rank)
            # hidden: the full gradient on every rank (all-reduced in the backward); weight / bias: own rows
            expected = [full_grads[0], full_grads[1][start:end]]
            if bias is not None:
                expected.append(full_grads[2][start:end])
            for leaf, g, e in zip(("hidden", "weight", "bias"), grads, expected):
                assert g.dtype == dtype and g.shape == e.shape, (name, leaf)
                if e.numel() and e.abs().max() > 0:
                    # sharded bf16: the hidden gradient sums per-shard partials rounded to bf16 (one more rounding)
                    tol = grad_tol(dtype) * (2 if dtype != torch.float32 and leaf == "hidden" else 1)
                    assert rel_err(g, e) <= tol, (name, rank, leaf, rel_err(g, e))
                else:
                    assert (g == 0).all(), (name, leaf)
    for r in ranks:
        assert torch.equal(r["plain-group"], r["plain"]["out"])
        nan = r["nan"]
        assert nan[1, 2].isnan() and torch.isfinite(nan[torch.arange(3) != 1]).all()
        assert torch.isfinite(nan[1, [0, 1, 3, 4, 5, 6]]).all()
        assert "leave a gap at 10" in r["errors"]["gap"]
        assert "overlap at 5" in r["errors"]["overlap"]
        assert "cover [0, 20), not [0, vocab_size=25)" in r["errors"]["short"]
        assert "targets must be replicated" in r["errors"]["targets"]


def test_vocab_parallel_matches_unsharded_torch_backend():
    """Values, the hidden gradient (full, on every rank) and each rank's weight / bias shard gradients, against
    the unsharded float64 reference and the unsharded op; uneven, reversed and one-column shards, bf16, shift,
    softcap, temperature, bias, a custom ignore_index, no tokens at all; NaN propagation; layout errors."""
    names = list(VP_CASES)
    ranks = run_ranks(_vp_worker, "torch", names)
    _check_vocab_parallel(ranks, names, "torch")


@pytest.mark.interpret
def test_vocab_parallel_triton_backend_under_interpreter():
    """The Triton kernels on a shard (out-of-shard targets: the forward's column match and the backward's one-hot
    stay inside the shard), at tiny shapes under TRITON_INTERPRET=1."""
    names = ["plain", "bias-shift", "reversed-shards"]
    ranks = run_ranks(_vp_worker, "triton", names)
    _check_vocab_parallel(ranks, names, "triton")


def _vp_faults_worker(rank: int, world: int) -> dict:
    """Mistakes on ONE rank (or that differ between the ranks): each call must raise on every rank."""
    hidden, weight, targets, _, _, _, _, _ = vp_inputs("plain")
    start, end = vp_shard("plain", rank)
    vocab = weight.shape[0]
    other = targets.clone()
    other[0, 1] = (other[0, 1] + 1) % vocab  # one id differs on rank 1
    cases = {
        "bad-option": {"temperature": 0.0 if rank == 1 else 1.0},
        "empty-shard": {"weight": weight[start:end] if rank == 0 else weight[:0], "vocab_start": 0 if rank == 0
                        else vocab},
        "bad-dtype": {"targets": targets.float() if rank == 1 else targets},
        "targets-differ": {"targets": other if rank == 1 else targets},
        "shift-differs": {"shift": rank == 1},
        "softcap-differs": {"softcap": 5.0 if rank == 1 else None},
    }  # fmt: skip
    errors = {}
    for name, change in cases.items():
        kwargs = {"weight": weight[start:end], "targets": targets, "vocab_start": start, **change}
        try:
            vocab_parallel_linear_logprobs(
                hidden,
                kwargs.pop("weight"),
                kwargs.pop("targets"),
                vocab_size=vocab,
                backend="torch",
                **kwargs,
            )
        except ValueError as err:
            errors[name] = str(err)
    return errors


def test_vocab_parallel_mistakes_on_one_rank_stop_every_rank():
    """A bad option, an empty shard or a bad dtype on one rank, or targets / options that differ between ranks:
    a ValueError on every rank before the op's collectives (none left waiting for the others), naming the
    argument; the failing rank raises its own message and the others quote it."""
    ranks = run_ranks(_vp_faults_worker)
    expected = {
        "bad-option": "temperature must be finite and > 0",
        "empty-shard": r"weight has an empty vocabulary",
        "bad-dtype": "targets must be an integer tensor",
        "targets-differ": r"targets must be replicated .* the ranks' targets differ",
        "shift-differs": r"shift must be the same on every rank .* \[0, 1\]",
        "softcap-differs": r"softcap must be the same on every rank .* \[None, 5\.0\]",
    }
    for rank, errors in enumerate(ranks):
        assert set(errors) == set(expected), (rank, errors)
        for name, pattern in expected.items():
            assert re.search(pattern, errors[name]), (rank, name, errors[name])
    for name in ("bad-option", "empty-shard", "bad-dtype"):  # rank 1 failed on its own; rank 0 quotes it
        assert "rank 1 of the process group" in ranks[0][name] and "rank 1" not in ranks[1][name]


# ----------------------------------------------------------------------------------------------- one process
def test_vocab_parallel_single_process_is_linear_logprobs():
    """Without torch.distributed the function is the plain op on a whole-vocabulary shard; bad shards raise."""
    hidden, weight, targets, bias, grad, kwargs, _, _ = vp_inputs("bias-shift")
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ours = vocab_parallel_linear_logprobs(
        *leaves[:2], targets, leaves[2], vocab_start=0, vocab_size=37, **kwargs
    )
    plain = linear_logprobs(*leaves[:2], targets, leaves[2], **kwargs)
    assert torch.equal(ours, plain)
    for a, b in zip(
        torch.autograd.grad((ours * grad).sum(), leaves), torch.autograd.grad((plain * grad).sum(), leaves)
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must be the whole vocabulary"):
        vocab_parallel_linear_logprobs(hidden, weight[:20], targets, vocab_start=0, vocab_size=37)
    with pytest.raises(ValueError, match="must lie inside"):
        vocab_parallel_linear_logprobs(hidden, weight, targets, vocab_start=5, vocab_size=37)
    with pytest.raises(ValueError, match="vocab_start must be an int"):
        vocab_parallel_linear_logprobs(hidden, weight, targets, vocab_start=0.0, vocab_size=37)
    with pytest.raises(ValueError, match="targets holds 40"):
        vocab_parallel_linear_logprobs(
            hidden, weight, torch.where(targets == IGNORE, IGNORE, 40), vocab_start=0, vocab_size=37
        )


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=pytest.mark.interpret),
        pytest.param("chunked", marks=pytest.mark.interpret),
    ],
)
def test_kernels_give_zero_target_logit_outside_the_shard(backend):
    """The backends' contract that the vocab-parallel op relies on: a target outside [0, V) (negative, or past
    V by less than a vocab tile, which a masked column would otherwise match) contributes 0 to the target logit
    and no one-hot term to the gradient: logp = -lse, and the gradient is that of -lse."""
    from prefuse.kernels.linear_logprobs import op

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=gen, dtype=torch.float32).requires_grad_()
    weight = torch.randn(10, 8, generator=gen).requires_grad_()
    rows = torch.arange(6)
    targets = torch.tensor([-1, 10, 11, 40, -7, 3])
    n_valid = torch.tensor([6])
    logp, lse, _ = op._call_forward(
        backend, hidden.detach(), weight.detach(), None, rows, targets, n_valid, None, 1.0, 1.0, False
    )
    z = hidden.detach() @ weight.detach().T
    expected_lse = torch.logsumexp(z, -1)
    torch.testing.assert_close(lse, expected_lse)
    expected = torch.where(targets == 3, z[:, 3], 0.0) - expected_lse
    torch.testing.assert_close(logp, expected)
    g = torch.ones(6)
    options = dict(softcap=None, inv_temperature=1.0, logit_scale=1.0, need_hidden=True, need_weight=True,
                   need_bias=False, deterministic=False, filter_eps=None)  # fmt: skip
    grad_h, grad_w, _ = op._call_backward(
        backend, hidden.detach(), weight.detach(), None, rows, targets, n_valid, lse, None, g, None, options
    )
    target_part = torch.where(targets == 3, (hidden @ weight.T)[:, 3], 0.0)
    want = torch.autograd.grad((target_part - torch.logsumexp(hidden @ weight.T, -1)).sum(), [hidden, weight])
    torch.testing.assert_close(grad_h, want[0])
    torch.testing.assert_close(grad_w, want[1])
