"""prefuse: fused Triton kernels (``prefuse.kernels``) and preference-alignment losses and trainers
(``prefuse.alignment``) for large-vocabulary LLMs. ``python -m prefuse`` runs the main job (``prefuse --help``)."""

from importlib.metadata import version as _version

__version__ = _version("prefuse")  # the one version, pyproject.toml's, from the installed metadata
