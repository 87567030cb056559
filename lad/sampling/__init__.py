"""Iterative denoising samplers, one self-contained function per strategy (see docs/sampling.md).

`STRATEGIES` maps a name to its function, so the CLI, the demo and the lm-eval harness pick `--strategy`
without importing each sampler themselves.
"""

from .common import Canvas, Generation, Step, build_canvas
from .ar import ar
from .confidence import confidence
from .refine import refine
from .threshold import threshold

STRATEGIES = {"refine": refine, "confidence": confidence, "threshold": threshold, "ar": ar}


def default_strategy(denoiser) -> str:
    """The sampler a run is best read with, from how it was trained (`lad.json`'s objective): `refine`, which can
    rewrite any token, for runs trained to repair wrong tokens (`structural` or `mixed` noise); `confidence` for
    runs trained on the plain mask objective, which never saw a wrong token to fix (docs/results.md measures
    both on such runs). A denoiser without run info gets `refine`."""
    info = getattr(denoiser, "lad_info", None)
    if info is None:
        return "refine"
    return "confidence" if info.objective == "mask" else "refine"


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["Canvas", "Generation", "STRATEGIES", "Step", "ar", "build_canvas", "confidence", "default_strategy",
           "get_strategy", "refine", "threshold"]
