"""prefuse.kernels: fused Triton kernels with a pure-PyTorch twin for each.

``linear_logprobs`` (per-token log-probs of a linear lm-head, optionally with ``TokenOutputs``: entropy,
``log sum p^2``, mean logit, is-top-1) and ``vocab_parallel_linear_logprobs`` (the same over a vocabulary-sharded
head).
"""

if __name__ != "prefuse.kernels":
    # The repository root is on sys.path (a script or `python -c` run from a checkout) and something imported the
    # top-level name `kernels` -- transformers does, probing for the PyPI distribution of that name. This folder
    # is only ever `prefuse.kernels`: hand the name to the real distribution further down sys.path, or, without
    # one, leave a module without `__file__` or `__version__`, which such probes read as "not installed".
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import types as _types

    def _step_aside(name: str, folder: str) -> None:
        root = _os.path.dirname(_os.path.realpath(folder))
        elsewhere = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != root]
        spec = _machinery.PathFinder.find_spec(name, elsewhere)
        if spec is None:
            _sys.modules[name] = _types.ModuleType(
                name, f"`{name}` is not installed (the folder {folder} is prefuse.{name})"
            )
            return
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module
        spec.loader.exec_module(module)

    _step_aside(__name__, _os.path.dirname(_os.path.abspath(__file__)))
else:
    from prefuse.kernels.linear_logprobs import TokenOutputs, linear_logprobs, vocab_parallel_linear_logprobs

    __all__ = ["TokenOutputs", "linear_logprobs", "vocab_parallel_linear_logprobs"]
