"""A sharded lm-head: FSDP2 on 2 gloo ranks (CPU), and a simulated DeepSpeed ZeRO-3 partition.

``model_head.CausalLMHead.apply`` runs the op (or the whole loss) inside the head module's own forward, so the
engines' module hooks gather the weight for the op's forward and backward and reduce-scatter its gradient
(``prefuse.alignment.model_head`` docstring). These tests drive the trainer's own loss path
(``PreferenceTrainer.preference_loss``) on a tiny Llama and compare with the unsharded single-process naive
computation (full logits, ``log_softmax``, gather):

- FSDP2 (``fully_shard``) on 2 gloo ranks, one DPO pair per rank: an untied head sharded on its own
  (``fully_shard(lm_head)``, resharded after forward: the op *must* run inside the head's forward and backward
  windows) and a tied head (in the root group, shared with the embedding). The mean of the ranks' losses and
  the FSDP-averaged gradients of every parameter (``full_tensor()``) equal the whole batch's.
- ZeRO-3, simulated in one process: the head's (and the tied embedding's) parameter data is emptied outside the
  module's forward, restored by a pre-forward hook and by a pre-backward hook on the forward's outputs, released
  after, and its gradient is taken away by a post-accumulate hook, as ZeRO-3 does. The op would fail on the
  empty weight, so agreement shows it never touches the weight outside the head's forward / backward.
- Real DeepSpeed ZeRO-3 on 2 gloo ranks (its CPU accelerator), when ``deepspeed`` is installed (CI skips it;
  passed with DeepSpeed 0.19.8, ``DS_BUILD_OPS=0``), untied and tied: the same comparison, gradients through
  ``safe_get_full_grad``.

What only a real multi-GPU DeepSpeed / FSDP2 run can show: NCCL collectives and streams (prefetch overlapping the
op, the all-gather landing before the Triton kernel reads it), ZeRO-3's parameter-trace prefetcher seeing the head
called twice per forward, mixed-precision (bf16 ``param_dtype``) reductions, and memory under real sharding.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from ranks import run_ranks
from torch.utils._pytree import tree_map

pytestmark = pytest.mark.slow  # spawns gloo ranks: CI runs it, `-m "not slow"` skips it

V, T, B, BETA = 300, 8, 2, 0.5  # B pairs: rank r of 2 takes pair r


def _model(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=V,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # larger logits: the head visibly matters
    return model


def _batch():
    """``2B`` rows, chosen ``[:B]`` then rejected ``[B:]``; a 3-token prompt, some right padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2 * B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[B, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows(batch, rank):
    """Rank ``rank``'s pair: chosen row ``rank`` and rejected row ``B + rank``."""
    index = torch.tensor([rank, B + rank])
    return {k: v[index] for k, v in batch.items()}


def _trainer(ref_model):
    """The real ``PreferenceTrainer`` loss path (``preference_loss``) without a ``transformers.Trainer`` set-up."""
    from prefuse.alignment import DPOLoss
    from prefuse.alignment.methods import get_method
    from prefuse.alignment.trainer import PreferenceTrainer

    trainer = PreferenceTrainer.__new__(PreferenceTrainer)
    trainer.args = types.SimpleNamespace(head="fused", loss_backend="torch")
    trainer.method, trainer.loss_module = "dpo", DPOLoss(BETA, backend="torch")
    trainer.spec = get_method("dpo")
    trainer.ref_model, trainer.ref_source = ref_model, "model"
    return trainer


def _naive_loss(model, ref_model, batch):
    """Whole-batch DPO from full logits (the single-process, unsharded answer)."""

    def sums(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(labels != -100, logp, 0.0).sum(-1)

    policy = sums(model)
    with torch.no_grad():
        ref = sums(ref_model)
    margin = (policy[:B] - ref[:B]) - (policy[B:] - ref[B:])
    return -F.logsigmoid(BETA * margin).mean()


def _expected(tied: bool):
    model, batch = _model(tied), _batch()
    ref_model = copy.deepcopy(model)
    loss = _naive_loss(model, ref_model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check(loss, grads, tied):
    loss_ref, grads_ref = _expected(tied)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------- FSDP2, 2 ranks
def _fsdp_rank(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    out = {}
    for tied in (False, True):
        model = _model(tied)
        ref_model = copy.deepcopy(model).requires_grad_(False)
        for m in (model, ref_model):
            for layer in m.model.layers:
                fully_shard(layer)
            if not tied:  # the head in its own group, resharded after forward: gathered only in its windows
                fully_shard(m.lm_head, reshard_after_forward=True)
            fully_shard(m)
        assert isinstance(model.get_output_embeddings().weight, DTensor)
        result = _trainer(ref_model).preference_loss(model, _rows(_batch(), rank))
        result.loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        out[tied] = (result.loss.detach(), grads)
    return out


def test_fsdp2_two_ranks_match_unsharded():
    """One DPO step under FSDP2 on 2 gloo ranks = the whole batch unsharded (untied head sharded alone; tied)."""
    pytest.importorskip("torch.distributed.fsdp")
    ranks = run_ranks(_fsdp_rank)
    for tied in (False, True):
        loss = torch.stack([r[tied][0] for r in ranks]).mean()  # FSDP averages gradients over ranks
        for r in ranks[1:]:  # FSDP's reduce-scatter leaves every rank the same (averaged) gradient
            for name, grad in r[tied][1].items():
                torch.testing.assert_close(grad, ranks[0][tied][1][name])
        _check(loss, ranks[0][tied][1], tied)


def _fsdp_tail_group_rank(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _model(False)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    for m in (model, ref_model):  # accelerate's FSDP2 layout: layers, the embedding, then [final norm, head]
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m.model.embed_tokens)
        fully_shard([m.model.norm, m.lm_head], reshard_after_forward=False)
        fully_shard(m)
    result = _trainer(ref_model).preference_loss(model, _rows(_batch(), rank))
    result.loss.backward()
    return {False: (result.loss.detach(), {n: p.grad.full_tensor() for n, p in model.named_parameters()})}


def test_fsdp2_norm_and_head_group():
    """The layout ``accelerate`` gives an FSDP2 model: the final norm and the lm-head in one group. The loss's
    call of the head after the model's forward must neither hook the group's gradient reduce-scatter a second
    time (it fired before the norm's backward, which then wrote into resharded storage: a crash) nor leave the
    group's forward open."""
    pytest.importorskip("torch.distributed.fsdp")
    ranks = run_ranks(_fsdp_tail_group_rank)
    _check(torch.stack([r[False][0] for r in ranks]).mean(), ranks[0][False][1], False)


# ----------------------------------------------------------------------------------------------- ZeRO-3, simulated
class _PreBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sim, x):
        ctx.sim = sim
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.sim.gather()  # ZeRO-3's pre-backward hook: the module's backward needs its parameters
        return None, grad


class _PostBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sim, x):
        ctx.sim = sim
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.sim.release()  # the module's backward is done (its inputs' gradients are being computed)
        return None, grad


class SimulatedZero3:
    """ZeRO-3's parameter life cycle for ``params`` on the modules that own them, in one process.

    Outside a module's forward / backward each parameter's ``.data`` is an empty tensor (ZeRO-3 keeps only the
    rank's partition, in ``ds_tensor``); a forward pre-hook restores the full data and a forward hook empties it
    again and hooks the outputs, whose gradient restores it (pre-backward); the inputs are hooked too, to empty it
    after the module's backward. Gradients are taken away as they accumulate (ZeRO-3 reduce-scatters them into
    the partition and frees ``.grad``) into ``self.grads``.
    """

    def __init__(self, modules, params: dict):
        self.full = {name: p.data for name, p in params.items()}
        self.params, self.grads, self.gathers = params, {}, 0
        for name, p in params.items():
            p.ds_shape = p.shape  # as ZeRO-3 records the full shape of a partitioned parameter
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, name=name: self._take_grad(name, p))
        for module in modules:
            module.register_forward_pre_hook(self._pre_forward)
            module.register_forward_hook(self._post_forward)
        self.release()

    def gather(self):
        self.gathers += 1
        for name, p in self.params.items():
            p.data = self.full[name]

    def release(self):
        for p in self.params.values():
            p.data = torch.empty(0, dtype=p.dtype)

    def _take_grad(self, name, p):
        self.grads[name] = self.grads.get(name, 0) + p.grad
        p.grad = None

    def _wrap(self, fn, value):
        return tree_map(
            lambda t: fn.apply(self, t) if isinstance(t, torch.Tensor) and t.requires_grad else t, value
        )

    def _pre_forward(self, module, args):
        self.gather()
        return self._wrap(_PostBackward, args)

    def _post_forward(self, module, args, output):
        self.release()
        return self._wrap(_PreBackward, output)


def _zero3(model):
    head = model.get_output_embeddings()
    modules = {id(m): m for m in (head, model.get_input_embeddings()) if m.weight is head.weight}
    return SimulatedZero3(list(modules.values()), {"weight": head.weight})


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_simulated_zero3_head(tied):
    """The trainer's loss with the head's weight present only inside its module's forward / backward windows."""
    from prefuse.alignment.model_head import forward_hidden
    from prefuse.kernels import linear_logprobs

    model = _model(tied)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    head_name = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    sims = [_zero3(model), _zero3(ref_model)]
    batch = _batch()

    head = forward_hidden(model, batch["input_ids"], batch["attention_mask"])
    assert head.weight.numel() == 0  # partitioned outside the forward: reading it there cannot work
    with pytest.raises(Exception):
        linear_logprobs(head.hidden, head.weight, batch["labels"], shift=True, backend="torch")

    result = _trainer(ref_model).preference_loss(model, batch)
    result.loss.backward()
    assert sims[0].gathers >= 3  # model forward, the loss in the head's forward, and the head's backward
    assert sims[1].gathers >= 2  # reference: model forward, the op in the head's forward (no backward)
    grads = {n: p.grad for n, p in model.named_parameters() if n != head_name}
    grads[head_name] = sims[0].grads["weight"]
    sims[0].gather()  # the naive reference needs the full weights back
    sims[1].gather()
    _check(result.loss.detach(), grads, tied)


# ----------------------------------------------------------------------------------------------- ZeRO-3, real
def _zero3_rank(rank: int, world: int) -> dict:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    import importlib

    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    # DeepSpeed's CPU accelerator would JIT-compile its shared-memory all-reduce (a C++ op: a minute of compiling
    # on a small machine, into TORCH_EXTENSIONS_DIR); gloo does the same reductions, and this test is about the
    # partitioned head, not the transport. (Imported by name: the attribute deepspeed.comm.torch is torch.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")  # joins run_ranks' gloo group
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    out = {}
    for tied in (False, True):
        engines = []
        for model in (_model(tied), _model(tied)):
            engine, *_ = deepspeed.initialize(
                model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0)
            )
            engines.append(engine)
        engine, ref_engine = engines
        ref_engine.eval()
        assert engine.module.get_output_embeddings().weight.numel() == 0  # partitioned
        result = _trainer(ref_engine).preference_loss(engine, _rows(_batch(), rank))
        engine.backward(result.loss)
        out[tied] = (
            result.loss.detach(),
            {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()},
        )
    return out


def test_deepspeed_zero3_two_ranks_match_unsharded():
    """Real DeepSpeed ZeRO-3 (CPU accelerator, gloo) when installed: the same step as unsharded."""
    pytest.importorskip("deepspeed")
    ranks = run_ranks(_zero3_rank)
    for tied in (False, True):
        _check(torch.stack([r[tied][0] for r in ranks]).mean(), ranks[0][tied][1], tied)
