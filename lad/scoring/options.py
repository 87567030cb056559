"""Every scoring option of the lm-eval model `lad`, declared once: its type, range, default and help.

`lad-eval`'s flags, `lm_eval --model lad --model_args ...` keys and `LadLM(...)` keyword arguments all come from
this table and are checked by `settings_problem`, so the three spell, default and refuse the same things (a test
holds each of them to it). Settings of the harness itself (batch size, device, weights, max_length) are LadLM's
own arguments.
"""

from __future__ import annotations

import sys

from ..defaults import ITERS, MC_SAMPLES, SCORE_ITERS, SCORE_ORDER
from ..options import Option, flag, value_problem
from ..sampling import STRATEGIES

AUTO_BATCH_SIZE = 16  # what lm-eval's batch_size=auto means here
SCORE_OPTIONS: dict[str, Option] = {
    "score": Option(str, "denoise: reveal the continuation step by step; elbo: Monte-Carlo bound (default denoise)",
                    choices=("denoise", "elbo"), default="denoise"),
    "iters": Option(int, "reveal steps per choice for --score denoise (default: one per token, the exact chain "
                         "rule; fewer score several tokens at once and tilt long choices, docs/scoring.md), and the "
                         f"sampler's iterations for generative tasks (default {ITERS})",
                    low=1, default=SCORE_ITERS, none_word="exact"),
    "order": Option(str, f"denoise: reveal left to right or most-confident first (default {SCORE_ORDER}: scored "
                         "best in docs/results.md)", choices=("confidence", "l2r"), default=SCORE_ORDER),
    "lookahead": Option(int, "denoise, l2r: show each reveal W masks after the text so far instead of one per "
                             "remaining token, so the model is not told how long each choice is (default: all of them)",
                        low=1, metavar="W"),
    "mc_samples": Option(int, f"elbo: Monte-Carlo samples per choice (default {MC_SAMPLES})", low=1,
                         default=MC_SAMPLES),
    "prefix_cache": Option(bool, "denoise, elbo: run each context once and only the continuation per step (exact, "
                                 "and on by default, for prompt-causal runs; an approximation otherwise)",
                           negatable=True, none_word="auto"),
    "strategy": Option(str, "sampler for generative tasks (default: the run's own, as lad-generate reads it)",
                       choices=tuple(sorted(STRATEGIES))),
    "baseline": Option(str, "ar: score the AR parent (adapter off, causal attention) instead (default none)",
                       choices=("none", "ar"), default="none"),
    "seed": Option(int, "every lm-eval and torch seed (default 0)", low=0, high=2**32 - 1, default=0,
                   rule="in [0, 2**32 - 1] (numpy's seed range)"),
}


def settings_problem(values: dict, label=lambda name: name) -> str | None:
    """The first value out of its range, or the first pair that does not go together, as one line naming each
    as `label` spells it (`flag` for lad-eval, the bare name for model_args and Python)."""
    for name, value in values.items():
        problem = value_problem(SCORE_OPTIONS, name, value, label(name))
        if problem:
            return problem
    lookahead, score, order = values.get("lookahead"), values.get("score"), values.get("order")
    if lookahead is not None and (score != "denoise" or order != "l2r"):
        return (f"{label('lookahead')} {lookahead} needs {label('score')} denoise {label('order')} l2r "
                f"(got {label('score')} {score} {label('order')} {order})")
    return None


def resolve_settings(given: dict) -> dict:
    """Every scoring option's value: as given (model_args strings turned into their kind), else its default.
    ValueError naming an unknown option (with the nearest known one) or the first value out of range."""
    import difflib

    for key in given:
        if key not in SCORE_OPTIONS:
            close = difflib.get_close_matches(key, SCORE_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown scoring option {key!r}{hint}; the options: {', '.join(SCORE_OPTIONS)}")
    values = {name: spec.parse(given[name]) if name in given else spec.default
              for name, spec in SCORE_OPTIONS.items()}
    problem = settings_problem(values)
    if problem:
        raise ValueError(problem)
    return values


def is_auto(value: str) -> bool:
    return value == "auto" or value.startswith("auto:") and value[5:].isdigit()  # lm-eval's auto, auto:N


def batch_size_problem(value: str, label: str = "--batch_size") -> str | None:
    if is_auto(value) or value.isdigit() and int(value) >= 1:
        return None
    return f"{label} must be a whole number >= 1 (or auto), got {value!r}"


def fixed_batch_size(value: str, who: str = "lad", label: str = "batch_size") -> int:
    """lm-eval's `auto` searches for the largest batch that fits; LAD's scorers take a fixed one, said so."""
    if is_auto(value):
        print(f"{who}: note: {label} {value}: LAD scores in fixed batches; using {AUTO_BATCH_SIZE}", file=sys.stderr)
        return AUTO_BATCH_SIZE
    return int(value)


__all__ = ["SCORE_OPTIONS", "batch_size_problem", "fixed_batch_size", "flag", "resolve_settings", "settings_problem"]
