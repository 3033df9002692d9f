"""prefuse.kernels: fused Triton kernels with a pure-PyTorch twin for each."""

if __name__ != "prefuse.kernels":  # the repo-root folder must not shadow PyPI's `kernels`
    raise ImportError(f"this folder is the package `prefuse.kernels`; it cannot be imported as `{__name__}`")

from prefuse.kernels.linear_logprobs import linear_logprobs, vocab_parallel_linear_logprobs

__all__ = ["linear_logprobs", "vocab_parallel_linear_logprobs"]
