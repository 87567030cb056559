"""Every sampling option, declared once: its type, its valid range and what it does.

A strategy's signature says which options it takes (`strategy_options`); this table says what each one is, so
that `lad-generate`'s flags, their help and their range checks, and the Python API's checks all come from one
place and say the same thing (a test holds every strategy option to an entry here).
"""

from __future__ import annotations

from ..defaults import POLISH_DOUBT, POLISH_KEEP, POLISH_WITH
from ..options import Option, add_flags, flag, value_problem

__all__ = ["OPTIONS", "POLISH_OPTIONS", "Option", "add_option_flags", "check_values", "flag", "option_problem"]


SLOTS = "confidence, threshold"
OPTIONS: dict[str, Option] = {
    "iters": Option(int, "iterations (forward passes at most)", low=1),
    "max_new_tokens": Option(int, "answer slots on the canvas", low=1),
    "seed": Option(int, "sampling seed (default 0)", low=-2**63, high=2**64 - 1, rule="a 64-bit integer"),
    "temperature": Option(float, "0 = greedy", low=0),
    "top_k": Option(int, "0 = off", low=0),
    "top_p": Option(float, "1 = off", low=0, high=1, low_open=True),
    "noise_start": Option(float, "refine: fraction re-masked after the first step (0..1)", low=0, high=1),
    "schedule": Option(str, "refine: how the re-mask fraction decays", choices=("linear", "exponential")),
    "remask": Option(str, "refine: which slots are re-masked; confidence: which are committed",
                     choices=("random", "confidence")),
    "retention": Option(str, "refine: kept slots", choices=("none", "editable", "locked")),
    "early_stop": Option(int, "stop after this many unchanged iterations (0 = off)", low=0, rule=">= 0 (0 = off)"),
    "block_length": Option(int, f"{SLOTS}: left-to-right blocks of this many slots", low=1),
    "threshold": Option(float, "threshold: commit slots with confidence >= this (> 1: one token per step)", low=0,
                        rule=">= 0 (a probability; > 1 commits one token per step)"),
    "delay_eos": Option(bool, f"{SLOTS}: commit EOS last"),
    "delay_repeats": Option(bool, f"{SLOTS}: a masked slot predicting the word of the masked slot left of it waits "
                                  "until that one is committed (parallel commits of one word loop)"),
    "prefix_cache": Option(bool, "refine, confidence, threshold: compute the prompt's K/V once and run only the "
                                 "answer slots (faster; approximate for a bidirectional run, exact for a prompt-causal "
                                 "one, where it is on unless --no-prefix-cache)", negatable=True),
    "block_cache": Option(bool, f"{SLOTS} with --block-length: also freeze the rest of the answer's K/V while a "
                                "block is decoded, running only the block's slots per forward (Fast-dLLM's dual "
                                "cache; approximate; implies the prompt's cache)"),
    "carry": Option(bool, f"{SLOTS} on a block-causal run: a finished block joins the exact cache in the next "
                          "block's first forward (default), or in a forward of its own (--no-carry)", negatable=True),
    "stop_at_eos": Option(bool, f"{SLOTS}: stop once an answer's text is final (an EOS with every slot before it "
                                "committed); the same text in fewer forwards (default: on)", negatable=True),
    "draft_length": Option(int, "speculative: tokens the denoiser drafts per round, checked by the parent "
                                "(default 4)", low=1),
    "adaptive": Option(bool, "speculative: double the draft after a round kept in full, halve it after one mostly "
                             "rejected"),
    "max_draft": Option(int, "speculative with --adaptive: the longest draft (default 16)", low=1),
    # not a strategy's: generate() runs them after any strategy (lad/sampling/polish.py)
    "polish": Option(int, "any strategy: then up to N noiseless refinement passes over the finished draft, each "
                          "re-predicting every slot from the draft (stops when a pass changes nothing; default 0)",
                     low=0, metavar="N"),
    "polish_keep": Option(float, "with --polish: a slot keeps its token when the denoiser gives it at least this "
                                 "probability (1 = every slot takes the filler's greedy token; default "
                                 f"{POLISH_KEEP:g})",
                          low=0, high=1, metavar="P"),
    "polish_with": Option(str, "with --polish: whose greedy token a slot the denoiser flags takes: the denoiser's, "
                               "the AR parent's given the answer before it as repaired so far (parent: flagged "
                               "slots are filled left to right), or their product's (both); the parent costs a "
                               f"forward per change (default {POLISH_WITH})",
                          choices=("denoiser", "parent", "both")),
    "polish_doubt": Option(float, "with --polish-with parent|both: a flagged slot changes only where the parent "
                                  "also gives its token less than this, reading the repaired text before it (1 = "
                                  f"the denoiser's flag alone; default {POLISH_DOUBT:g})",
                           low=0, high=1, metavar="P"),
}
POLISH_OPTIONS = ("polish", "polish_keep", "polish_with", "polish_doubt")


def option_problem(name: str, value, label: str | None = None) -> str | None:
    """One line saying why `value` is not valid for option `name` ("--iters must be >= 1, got 0"), else None."""
    return value_problem(OPTIONS, name, value, label)


def check_values(**values) -> None:
    """ValueError naming the first option whose value is out of its range: the samplers' own guard, so a direct
    call (ids in, ids out) is checked exactly as the command and generate() check it."""
    for name, value in values.items():
        problem = option_problem(name, value)
        if problem:
            raise ValueError(problem)


def add_option_flags(group, names, defaults: dict | None = None) -> None:
    """Add the flag of each option in `names` to an argparse group, typed and explained by its entry. Default
    None means "not given": the strategy keeps its own default (`defaults` sets others, e.g. polish's)."""
    add_flags(group, OPTIONS, names, defaults)
