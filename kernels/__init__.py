"""prefuse.kernels: fused Triton kernels with a pure-PyTorch twin for each.

``linear_logprobs`` (per-token log-probs of a linear lm-head, optionally with ``TokenOutputs``: entropy,
``log sum p^2``, mean logit, is-top-1) and ``vocab_parallel_linear_logprobs`` (the same over a vocabulary-sharded
head).
"""

if __name__ != "prefuse.kernels":  # the repo-root folder must not shadow PyPI's `kernels`
    raise ImportError(f"this folder is the package `prefuse.kernels`; it cannot be imported as `{__name__}`")

from prefuse.kernels.linear_logprobs import TokenOutputs, linear_logprobs, vocab_parallel_linear_logprobs

__all__ = ["TokenOutputs", "linear_logprobs", "vocab_parallel_linear_logprobs"]
