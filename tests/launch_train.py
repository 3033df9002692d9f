"""Two DPO steps of a tiny Llama on the bundled data, written as a user's training script: the slow tests run it
under ``accelerate launch`` with the configs prefuse ships (2 CPU processes, gloo) and compare its losses with the
same function called in one process.

``python tests/launch_train.py --trainer preference|trl --out DIR`` writes ``DIR/result.json`` (process 0): the
logged losses, the world size and what wrapped the model (``ddp``, ``fsdp2``, ``zero3`` or ``none``), so that a
launch that silently fell back to one process or to plain data parallelism fails the test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

import torch

STEPS, GLOBAL_PAIRS = 2, 4  # per step: 4 pairs in one process, 2 per process in two


def _model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # larger logits: the head visibly matters
    return model


def _engine(trainer) -> str:
    """What holds the model's parameters: ``zero3`` (partitioned by DeepSpeed), ``fsdp2`` (``DTensor`` shards),
    ``ddp`` (``DistributedDataParallel``) or ``none``."""
    from torch.distributed.tensor import DTensor

    params = list(trainer.model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(isinstance(p, DTensor) for p in params):
        return "fsdp2"
    if isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    return "none"


def fsdp_on_cpu() -> None:
    """Let ``accelerate`` run FSDP on CPU processes (test only).

    ``accelerate`` applies an FSDP config only on accelerator devices: CPU processes become ``MULTI_CPU``, which
    silently trains plain data parallel. Here the launched processes are declared an accelerator group on gloo
    with CPU tensors (``ACCELERATE_TORCH_DEVICE=cpu``), so the FSDP2 plugin shards the model as on GPUs.
    """
    from accelerate.state import DistributedType, PartialState

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo",
        DistributedType.MULTI_GPU,
    )


def train(kind: str, out_dir: str, processes: int = 1) -> dict:
    """``STEPS`` DPO steps (``kind``: ``preference`` = PreferenceTrainer, ``trl`` = PrefuseDPOTrainer) on
    ``GLOBAL_PAIRS`` pairs per step split over ``processes``; the logged losses and the engine."""
    from prefuse.alignment.data import build_tokenizer, load_preference_data

    tokenizer = build_tokenizer()
    data = load_preference_data("paired", limit=GLOBAL_PAIRS * STEPS).select_columns(
        ["prompt", "chosen", "rejected"]
    )
    common = {"output_dir": out_dir, "per_device_train_batch_size": GLOBAL_PAIRS // processes, "max_steps": STEPS,
              "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0,
              "disable_tqdm": True, "train_sampling_strategy": "sequential", "beta": 0.1, "max_length": 32,
              "use_cpu": os.environ.get("ACCELERATE_TORCH_DEVICE") != "cpu"}  # fmt: skip
    model = _model(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "preference":
            from prefuse.alignment import PreferenceConfig, PreferenceTrainer

            config = PreferenceConfig(method="dpo", loss_backend="torch", max_prompt_length=16, **common)
            trainer = PreferenceTrainer(model, args=config, train_dataset=data, processing_class=tokenizer)
        else:
            from prefuse.alignment.trl import PrefuseDPOTrainer
            from trl import DPOConfig

            config = DPOConfig(dataset_num_proc=None, bf16=False, **common)
            trainer = PrefuseDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                                        train_dataset=data, processing_class=tokenizer)  # fmt: skip
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "processes": trainer.accelerator.num_processes, "engine": _engine(trainer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trainer", choices=("preference", "trl"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp-on-cpu", action="store_true", help="FSDP on CPU processes (fsdp_on_cpu)")
    args = parser.parse_args()
    if args.fsdp_on_cpu:
        fsdp_on_cpu()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    result = train(args.trainer, args.out, processes)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    # A process that exits with its gloo group alive can abort in the interpreter's teardown (gloo's worker
    # threads still hold tensors): "terminate called without an active exception", SIGABRT. End it here, as
    # every launched training script should.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
