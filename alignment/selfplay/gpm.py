"""``GeneralPreferenceModel`` (GPM): preference embeddings and a skew-symmetric operator.

Each response ``y`` to a prompt ``x`` is embedded as a unit vector ``v = normalize(W h) ∈ R^{2k}``, ``h`` the
backbone's last hidden state of the conversation's last token. With the block-diagonal skew-symmetric operator

    R = diag(λ_1 J, …, λ_k J),   J = [[0, −1], [1, 0]],   λ_l ≥ 0,

the preference score and probability are

    s(y_i ≻ y_j | x) = v_iᵀ R v_j,     P(y_i ≻ y_j | x) = σ(s(y_i ≻ y_j | x) / τ).

``Rᵀ = −R`` makes ``s`` skew-symmetric: ``s(j≻i) = −s(i≻j)``, ``s(i≻i) = 0``, hence ``P(i≻j) + P(j≻i) = 1``.
A prompt's ``K × K`` table comes from its ``K`` embeddings in one batched product ``V R Vᵀ`` (all prompts at
once); it is then projected onto the skew-symmetric matrices, ``½(S − Sᵀ)``, which leaves the exact values
unchanged and makes the symmetry exact in floating point.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import torch
from prefuse.alignment.selfplay.preference import PreferenceModel, check_responses, check_tau
from prefuse.alignment.selfplay.text import conversation_text, encode, last_token_states
from torch import Tensor, nn

HEAD_FILE = "preference_head.safetensors"
HEAD_CONFIG = "preference_head.json"


def skew_operator(scales: Tensor) -> Tensor:
    """``R = diag(λ_1 J, …, λ_k J)`` ``(2k, 2k)`` for ``scales = (λ_1, …, λ_k)``, ``J = [[0, −1], [1, 0]]``."""
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=scales.dtype, device=scales.device)
    return torch.block_diag(*[lam * j for lam in scales.unbind()])


class GeneralPreferenceModel(nn.Module, PreferenceModel):
    """GPM (module docstring).

    Args:
        backbone: a ``transformers`` base model (``AutoModel``) whose output has ``last_hidden_state``.
        tokenizer: its tokenizer (needs a pad token); conversations use its chat template when it has one.
        dim: the embedding size ``2k`` (even) when ``value_head`` is not given.
        value_head: the projection ``W`` (``nn.Linear(hidden, 2k, bias=False)``); default a fresh one.
        block_scales: ``(λ_1, …, λ_k)`` ``≥ 0`` (default all ones).
        tau: the temperature of ``P = σ(s / τ)``.
        max_length: tokens per conversation (truncated from the left).
        batch_size: conversations per forward when scoring.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        dim: int = 8,
        value_head: nn.Linear | None = None,
        block_scales: Tensor | None = None,
        tau: float = 0.1,
        max_length: int = 512,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        hidden = backbone.config.hidden_size
        if value_head is None:
            if dim < 2 or dim % 2:
                raise ValueError(f"dim must be a positive even number (2k), got {dim!r}")
            value_head = nn.Linear(hidden, dim, bias=False)
        if value_head.in_features != hidden or value_head.out_features % 2:
            raise ValueError(
                f"value_head must map the backbone's {hidden} features to an even size, got "
                f"{value_head.in_features} -> {value_head.out_features}"
            )
        k = value_head.out_features // 2
        scales = torch.ones(k) if block_scales is None else torch.as_tensor(block_scales, dtype=torch.float32)
        if scales.shape != (k,) or not torch.isfinite(scales).all() or (scales < 0).any():
            raise ValueError(f"block_scales must be {k} finite numbers >= 0, got {scales.tolist()}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer must have a pad token")
        if max_length < 8 or batch_size < 1:
            raise ValueError(f"max_length must be >= 8 and batch_size >= 1, got {max_length}, {batch_size}")
        param = next(backbone.parameters())
        self.backbone, self.tokenizer = backbone, tokenizer
        self.value_head = value_head.to(device=param.device, dtype=param.dtype)
        self.register_buffer("block_scales", scales.to(param.device))
        self.tau, self.max_length, self.batch_size = check_tau(tau), max_length, batch_size

    # ------------------------------------------------------------------------------------------ io
    @classmethod
    def from_pretrained(
        cls, path: str, *, trust_remote_code: bool = False, **kwargs
    ) -> GeneralPreferenceModel:
        """Backbone (``AutoModel``) and tokenizer from a Hugging Face folder; the head from its
        ``preference_head.safetensors``, else from a ``value_head.weight`` (and optional ``block_scales``) tensor
        in the folder's ``*.safetensors`` / ``*.bin`` weights (``.bin`` read with ``weights_only=True``)."""
        from transformers import AutoModel, AutoTokenizer

        backbone = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        tensors = _head_tensors(path)
        weight = tensors["value_head.weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        config_file = os.path.join(path, HEAD_CONFIG)
        if os.path.isfile(config_file):
            with open(config_file) as f:
                kwargs = {**json.load(f), **kwargs}
        return cls(backbone, tokenizer, value_head=head, block_scales=tensors.get("block_scales"), **kwargs)

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_file(
            {
                "value_head.weight": self.value_head.weight.detach().cpu().contiguous(),
                "block_scales": self.block_scales.detach().cpu().contiguous(),
            },
            os.path.join(path, HEAD_FILE),
        )
        with open(os.path.join(path, HEAD_CONFIG), "w") as f:
            json.dump({"tau": self.tau}, f)

    # ------------------------------------------------------------------------------------------ math
    @property
    def device(self) -> torch.device:
        return self.block_scales.device

    def operator(self) -> Tensor:
        """The ``(2k, 2k)`` skew-symmetric block-diagonal ``R``."""
        return skew_operator(self.block_scales.to(self.value_head.weight.dtype))

    def embed(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """``(n, 2k)`` unit embeddings of the conversations ``(prompts[i], responses[i])`` (grad as the caller's
        context allows)."""
        texts = [conversation_text(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        batch = encode(
            self.tokenizer, texts, max_length=self.max_length, padding_side="right", device=self.device
        )
        hidden = self.backbone(**batch).last_hidden_state
        return nn.functional.normalize(
            self.value_head(last_token_states(hidden, batch["attention_mask"])), dim=-1
        )

    def pair_scores(self, prompts, firsts, seconds) -> Tensor:
        """``(n,)`` ``s(a≻b) = v_aᵀ R v_b``, with grad."""
        n = len(prompts)
        v = self.embed(list(prompts) * 2, list(firsts) + list(seconds)).float()
        return ((v[:n] @ self.operator().float()) * v[n:]).sum(-1)

    def score_batch(self, prompts, responses) -> Tensor:
        k = check_responses(prompts, responses)
        flat_prompts = [p for p in prompts for _ in range(k)]
        flat = [r for group in responses for r in group]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                v = torch.cat(
                    [
                        self.embed(flat_prompts[i : i + self.batch_size], flat[i : i + self.batch_size])
                        for i in range(0, len(flat), self.batch_size)
                    ]
                ).float()
                v = v.reshape(len(prompts), k, -1)
                scores = (v @ self.operator().float()) @ v.transpose(1, 2)  # (N, K, K) in one batched product
        finally:
            self.train(was_training)
        return (0.5 * (scores - scores.transpose(1, 2))).cpu()


def _head_tensors(path: str) -> dict[str, Tensor]:
    """``value_head.weight`` (and ``block_scales``) from the folder's weight files, matched by name suffix."""
    from safetensors import safe_open

    own = os.path.join(path, HEAD_FILE)
    files = [own] if os.path.isfile(own) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    found: dict[str, Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                for name in ("value_head.weight", "block_scales"):
                    if key == name or key.endswith("." + name):
                        found[name] = f.get_tensor(key)
    if "value_head.weight" not in found:
        for file in sorted(glob.glob(os.path.join(path, "*.bin"))):
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, value in state.items():
                for name in ("value_head.weight", "block_scales"):
                    if key == name or key.endswith("." + name):
                        found[name] = value
    if "value_head.weight" not in found:
        raise ValueError(f"no value_head.weight tensor in {path!r}: not a general preference model folder")
    return found
