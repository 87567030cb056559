"""Iterative denoising samplers, one self-contained function per strategy (see docs/sampling.md).

`STRATEGIES` maps a name to its function, so the CLI, the demo and the lm-eval harness pick `--strategy`
without importing each sampler themselves.
"""

import inspect

from ..defaults import OBJECTIVE, strategy_for
from .common import Canvas, Generation, Step, build_canvas
from .ar import ar
from .confidence import confidence
from .refine import refine
from .speculative import speculative
from .threshold import threshold

STRATEGIES = {"refine": refine, "confidence": confidence, "threshold": threshold, "ar": ar,
              "speculative": speculative}
# strategies that run the AR parent (adapter off): a run needs one, and they have no fixed number of iterations
PARENT_STRATEGIES = ("ar", "speculative")


def default_strategy(denoiser) -> str:
    """The sampler the denoiser's run is best read with (`LadInfo.strategy`, from its training objective); a
    denoiser built without run settings gets the one for LAD's default objective (lad/defaults.py)."""
    info = denoiser.info
    return info.strategy if info is not None else strategy_for(OBJECTIVE)


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def strategy_options(name: str) -> set[str]:
    """The options a strategy declares: its keyword-only parameters. The signature is the one declaration; the
    CLI, the demo and lm-eval pass only these, and a strategy refuses any other (a misspelling is an error)."""
    parameters = inspect.signature(get_strategy(name)).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}


def split_options(name: str, options: dict) -> tuple[dict, dict]:
    """(the options strategy `name` declares, those only other strategies declare); ValueError naming an option
    that no strategy declares (with the closest one)."""
    import difflib

    known = set().union(*(strategy_options(s) for s in STRATEGIES))
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ValueError(f"unknown sampling option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    mine = strategy_options(name)
    return ({k: v for k, v in options.items() if k in mine}, {k: v for k, v in options.items() if k not in mine})


__all__ = ["Canvas", "Generation", "PARENT_STRATEGIES", "STRATEGIES", "Step", "ar", "build_canvas", "confidence", "default_strategy",
           "get_strategy", "refine", "speculative", "split_options", "strategy_options", "threshold"]
