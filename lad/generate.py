"""Generate from a LAD run by iterative denoising: `lad-generate --model RUN_DIR --prompt "..."` (or `lad generate`).

    lad-generate --model runs/tiny --prompt "What is the capital of France?" --iters 16 --show
    lad-generate --model runs/tiny --prompts-file questions.jsonl --batch-size 8 --json > trace.jsonl
    lad-generate --model runs/tiny --prompt "2+2?" --strategy confidence --block-length 8 --ar

Python API (see docs/sampling.md):

    from lad.generate import generate, load
    gens = generate("runs/tiny", ["What is 2+2?"], strategy="refine", iters=16, max_new_tokens=32)
    denoiser, tokenizer = load("runs/tiny")           # load once, then call generate(denoiser, ...) many times
    gens = generate(denoiser, "Hello", tokenizer=tokenizer, seed=1)

Options are passed to the strategy function as keyword arguments, checked against lad/sampling/options.py (one
declaration of each option's range); an option only another strategy takes is an error here (the command notes
it and leaves it out, lad/generate_cli.py). Options not given keep each strategy's defaults.
"""

from __future__ import annotations

import inspect
import os
import sys

import torch

from .defaults import POLISH_DOUBT, POLISH_KEEP, POLISH_WITH
from .sampling import STRATEGIES, Generation, default_strategy, get_strategy, split_options, strategy_options
from .sampling.options import OPTIONS, option_problem
from .sampling.polish import polish as polish_drafts
from .sampling.render import decode_pieces

DEFAULT_BATCH_SIZE = 8


class GenerateError(ValueError):
    """A user error in what was asked for (prompts, options); reported as one line, exit status 2."""


# ---------------------------------------------------------------- Python API


def load(model: str | os.PathLike, *, device: str | torch.device | None = None, weights: str = "final"):
    """Load a run for repeated `generate` calls: (denoiser, tokenizer). The denoiser holds the run's settings
    (`denoiser.info`, from lad.json), so prompts are rendered as training rendered them."""
    from .run import load_run

    denoiser, tokenizer, _ = load_run(model, device=device, weights=weights)
    return denoiser, tokenizer


def _chat_template(denoiser, options: dict) -> bool | str:
    if options.get("chat_template") is not None:
        value = options.pop("chat_template")
        return value if value == "raw" else bool(value)
    options.pop("chat_template", None)
    return denoiser.info.chat_template if denoiser.info is not None else True


def generate(model, prompts: list[str] | str, *, strategy: str | None = None, tokenizer=None,
             batch_size: int | None = None, device: str | torch.device | None = None, weights: str = "final",
             polish: int = 0, polish_keep: float = POLISH_KEEP, polish_with: str = POLISH_WITH,
             polish_doubt: float = POLISH_DOUBT, on_step=None, trace: bool = False, **options) -> list[Generation]:
    """Answer `prompts` with `strategy` (default: the run's own, `default_strategy`); returns one `Generation`
    per prompt, in order.

    model: a run directory (loaded here; `device`, `weights` as for `load_run`) or a `Denoiser` (then
    `tokenizer` is required). Prompts run in batches of `batch_size` (default: 8). `options` go to the
    strategy (max_new_tokens, iters, seed, temperature, ...); `chat_template` defaults to the run's.
    `polish`: up to this many noiseless refinement passes over each finished draft (lad/sampling/polish.py), in
    which a slot keeps its token when the denoiser gives it at least `polish_keep` probability; `polish_with`: whose
    greedy token a flagged slot takes (denoiser, parent, both; the parent fills left to right); `polish_doubt` < 1:
    a flagged slot changes only where the parent too gives its token less than this.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise GenerateError("no prompts given")
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise GenerateError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(polish, bool) or not isinstance(polish, int):
        raise GenerateError(f"polish must be an integer >= 0, got {polish!r}")
    polishing = {"polish": polish, "polish_keep": polish_keep, "polish_with": polish_with, "polish_doubt": polish_doubt}
    for name, value in {**options, **polishing}.items():
        problem = option_problem(name, value) if name in OPTIONS else None  # unknown names: split_options below
        if problem:
            raise GenerateError(problem)
    if strategy is not None and strategy not in STRATEGIES:
        raise GenerateError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load(model, device=device, weights=weights)
        tokenizer = tokenizer or loaded_tokenizer
    elif tokenizer is None:
        raise GenerateError("generate(denoiser, ...) needs tokenizer=; or pass a run directory")
    strategy = strategy or default_strategy(model)
    chat_template = _chat_template(model, options)
    try:
        _, others = split_options(strategy, options)
    except ValueError as err:
        raise GenerateError(str(err)) from None
    if others:
        owners = ", ".join(s for s in STRATEGIES if set(others) <= strategy_options(s)) or "other strategies"
        raise GenerateError(f"strategy {strategy!r} does not take {', '.join(sorted(others))} (options of {owners})")
    fn = get_strategy(strategy)
    width = options.get("max_new_tokens", inspect.signature(fn).parameters["max_new_tokens"].default)
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        drafts = fn(model, tokenizer, prompts[start:start + batch_size], chat_template=chat_template,
                    on_step=on_step, trace=trace, **options)
        out += polish_drafts(model, tokenizer, drafts, polish, max_new_tokens=width, chat_template=chat_template,
                             keep=polish_keep, with_=polish_with, doubt=polish_doubt, on_step=on_step, trace=trace)
    return out


def ar_generate(denoiser, tokenizer, prompts: list[str], *, chat_template: bool = True, **options) -> list[Generation]:
    """The AR parent's answers (adapter off, causal attention, HF `generate` with its KV cache): the `ar`
    strategy, given the same options (those it does not use are ignored)."""
    return get_strategy("ar")(denoiser, tokenizer, prompts, chat_template=chat_template,
                              **split_options("ar", options)[0])


def trace_dict(gen: Generation, tokenizer, cache: dict | None = None) -> dict:
    """`Generation.to_dict()` plus each step's decoded token strings ("pieces"; null where masked)."""
    out = gen.to_dict()
    cache = {} if cache is None else cache
    for step, record in zip(gen.steps, out["steps"]):
        pieces = decode_pieces(tokenizer, step.tokens, cache)
        record["pieces"] = [None if m else p for p, m in zip(pieces, step.masked)]
    return out


TOY_PARAMETERS = 1_000_000


def toy_note(denoiser) -> str | None:
    """What to expect from a model this small (recipes/tiny.yaml: 140k parameters, trained for seconds), said where
    its answers are shown so that noise is not taken for a broken install."""
    count = sum(p.numel() for p in denoiser.parameters())
    if count >= TOY_PARAMETERS:
        return None
    return (f"a {count:,}-parameter model answers with noise: it shows the pipeline working, not language "
            "(docs/scratch.md trains a small model that writes words)")


def main(argv: list[str] | None = None) -> int:
    """`lad-generate`: the command line lives in lad/generate_cli.py."""
    from .generate_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
