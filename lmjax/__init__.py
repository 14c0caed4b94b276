"""lmjax: language-model scaling research in JAX/Flax.

`from lmjax import load_model` (lmjax/api.py) loads any lmjax model, from a run directory or a
Hugging Face model directory; imported lazily, so `import lmjax` (and the CLI) starts fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load_model", "Model"):
        from lmjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmjax' has no attribute {name!r}")


__all__ = ["Model", "load_model", "__version__"]
