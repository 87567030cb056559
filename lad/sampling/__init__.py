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


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["Canvas", "Generation", "STRATEGIES", "Step", "ar", "build_canvas", "confidence", "get_strategy", "refine",
           "threshold"]
