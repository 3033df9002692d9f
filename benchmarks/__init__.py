"""prefuse's benchmark suite: prefuse against naive PyTorch, TRL's fused head, Liger-Kernel and Cut Cross-Entropy.

Run from the repository root (this folder is not part of the installed package)::

    python -m benchmarks                      # the full report on this machine's device
    python -m benchmarks --device cuda        # GPU shapes and contenders (Llama-3-8B and Gemma-2 heads)
    python -m benchmarks --quick              # a short version of the same report
    pytest benchmarks/ --benchmark-only       # the same workloads through pytest-benchmark

Modules, in the order data flows through them:

- ``plan``: heads (D, V, dtype, softcap), sweeps of token counts, the presets per device;
- ``inputs``: reproducible inputs of one case (hidden states, heads, labels, KL rows, sentences, win rates);
- ``providers``: per-token log-prob providers (naive full logits, TRL's fused head, Cut Cross-Entropy, Liger's
  fused linear cross-entropy, the float64 reference);
- ``formulas``: each workload's loss written on top of a provider (the "naive" contenders and the reference);
- ``contenders``: the callables compared per workload (naive, TRL, Liger-Kernel, Cut Cross-Entropy, prefuse);
- ``measure``: one measurement (time of forward+backward, peak memory, the output checked for errors);
- ``runner``: runs a plan (a fresh subprocess per measurement on CPU), computes the errors;
- ``report``, ``plots``, ``environment``: JSON, Markdown table and PNG plots under ``results/<device>/``.

``aot.py`` (the sm_90 compile gate), ``floor.py`` (the predicted roofline, the measured ceilings) and
``gpu_session.sh`` (everything above on a CUDA machine) run on their own.
"""
