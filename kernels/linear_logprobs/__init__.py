"""Fused linear log-probs: ``log_softmax(hidden @ weight.T)[target]`` (and optional per-token statistics) without
materialising the logits.

With scaled logits ``z = softcap(s (h W^T + b)) / T`` (logit scale ``s``, ``softcap(x) = c tanh(x / c)``,
temperature ``T``), per scored token: ``logp = z_t - logsumexp(z)``, and on request the entropy
``H = logsumexp(z) - sum_j p_j z_j``, ``log sum_j p_j^2``, ``mean_j z_j`` and whether ``t`` is the first argmax of
``z`` (``TokenOutputs``).

Files: ``op.py`` (public function, row plan, torch.library ops), ``chunked.py`` (the chunked-GEMM driver),
``chunked_triton.py`` (its Triton passes: backend ``"chunked"``), ``torch_twin.py`` (the same passes in
PyTorch: backend ``"torch"``), ``triton_fwd.py`` / ``triton_bwd.py`` (all-fused Triton kernels: backend
``"triton"``), ``naive.py`` (full-logits reference), ``validate.py`` (argument checks), ``vocab_parallel.py``
(the head's vocabulary sharded over a process group: ``vocab_parallel_linear_logprobs``).
"""

from prefuse.kernels.linear_logprobs.naive import naive_linear_logprobs, naive_token_outputs
from prefuse.kernels.linear_logprobs.op import TokenOutputs, linear_logprobs
from prefuse.kernels.linear_logprobs.vocab_parallel import vocab_parallel_linear_logprobs

__all__ = [
    "TokenOutputs",
    "linear_logprobs",
    "naive_linear_logprobs",
    "naive_token_outputs",
    "vocab_parallel_linear_logprobs",
]
