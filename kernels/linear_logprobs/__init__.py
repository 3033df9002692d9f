"""Fused linear log-probs: ``log_softmax(hidden @ weight.T)[target]`` without materialising the logits.

Files: ``op.py`` (public function, row plan, torch.library ops), ``triton_fwd.py`` / ``triton_bwd.py``
(Triton kernels and launchers), ``torch_twin.py`` (chunked PyTorch twin), ``naive.py`` (full-logits
reference), ``validate.py`` (argument checks), ``vocab_parallel.py`` (the head's vocabulary sharded over a process
group: ``vocab_parallel_linear_logprobs``).
"""

from prefuse.kernels.linear_logprobs.naive import naive_linear_logprobs
from prefuse.kernels.linear_logprobs.op import linear_logprobs
from prefuse.kernels.linear_logprobs.vocab_parallel import vocab_parallel_linear_logprobs

__all__ = ["linear_logprobs", "naive_linear_logprobs", "vocab_parallel_linear_logprobs"]
