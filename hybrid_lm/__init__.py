"""hybrid-lm: fast hybrid decoder architectures and the Triton kernels under them.

`hybrid_lm.config(arch, preset, **overrides)` and `hybrid_lm.build(config)` make the models
(transformer, samba, sambay, sambay-da, lrt); importing the package registers them with
transformers' Auto classes. `hybrid_lm.kernels` holds the ops under them.
"""
__version__ = "0.1.0"

from .archs import build, config  # noqa: E402  (registers the models with transformers)

__all__ = ["build", "config", "__version__"]
