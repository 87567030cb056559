"""LAD: turn a pretrained autoregressive LLaMA-family model into a diffusion language model with LoRA.

The public API is imported lazily, so `import lad` stays cheap (no torch/transformers until used).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "lad.recipe",
    "load_recipe": "lad.recipe",
    "load_run": "lad.run",
    "LadInfo": "lad.run",
    "Denoiser": "lad.modeling.denoiser",
    "make_bidirectional": "lad.modeling.bidirectional",
    "NoiseConfig": "lad.noise",
    "corrupt": "lad.noise",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lad' has no attribute {name!r}")
