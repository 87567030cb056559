"""The demo page's pure parts: a sampler `Step` as coloured HTML tokens, and the page's settings as sampler options.

No Gradio here, so both are tested without a browser or a server (tests/test_demo.py). A slot is one of three
kinds: `masked` (red: still the mask token), `changed` (green: its value changed this step) or `kept`
(plain); slots after the first EOS are additionally `after-eos` (dimmed: `finish` cuts them off). Colours are
inline styles, so the page looks the same whatever Gradio version or theme serves it; the classes
(`lad-masked`, `lad-changed`, `lad-kept`, `lad-after-eos`, `lad-final`) are what tests and CSS hook onto.
"""

from __future__ import annotations

import html
import math
from typing import NamedTuple

from ..console import printable
from ..defaults import DRAFT_LENGTH, MAX_DRAFT
from ..sampling import STRATEGIES
from ..sampling.options import OPTIONS
from ..sampling.render import MASK_GLYPH, visible

STYLES = {
    "masked": "background:#fecaca;color:#b91c1c;",
    "changed": "background:#bbf7d0;color:#166534;",
    "kept": "",
}
AFTER_EOS_STYLE = "opacity:.4;"
BOX_STYLE = ("font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:15px;line-height:1.9;"
             "white-space:pre-wrap;word-break:break-word;min-height:3.8em;padding:10px 12px;"
             "border:1px solid #d4d4d8;border-radius:8px;")
TOKEN_STYLE = "border-radius:3px;padding:1px 0;"
# The page's own upper ends, where an option has none (lad/sampling/options.py gives every lower end): a page
# caps the work one visitor can ask for; longer answers and runs belong to lad-generate.
PAGE_HIGH = {"iters": 1024, "max_new_tokens": 1024, "polish": 64, "temperature": 100, "threshold": 2,
             "draft_length": MAX_DRAFT}


class SettingsError(ValueError):
    """A setting the page cannot run with; shown in the page as one line."""


class Segment(NamedTuple):
    text: str
    kind: str  # "masked" | "changed" | "kept"
    after_eos: bool


def show(piece: str) -> str:
    """A decoded token as it is drawn: control characters visible, a newline as `↵` plus a real line break."""
    return "↵\n".join(visible(part) for part in piece.split("\n"))


def segments(step, pieces: list[str], eos_ids: set[int]) -> list[Segment]:
    """One `Segment` per answer slot of `step`; `pieces[i]` is slot i's token decoded alone."""
    out, after_eos = [], False
    for token, piece, masked, changed in zip(step.tokens, pieces, step.masked, step.changed):
        after_eos = after_eos or (not masked and token in eos_ids)
        kind = "masked" if masked else "changed" if changed else "kept"
        out.append(Segment(MASK_GLYPH if masked else show(piece), kind, after_eos))
    return out


def segments_html(parts: list[Segment]) -> str:
    spans = []
    for part in parts:
        classes = f"lad-tok lad-{part.kind}" + (" lad-after-eos" if part.after_eos else "")
        style = TOKEN_STYLE + STYLES[part.kind] + (AFTER_EOS_STYLE if part.after_eos else "")
        spans.append(f'<span class="{classes}" style="{style}">{html.escape(part.text)}</span>')
    return f'<div class="lad-steps" style="{BOX_STYLE}">{"".join(spans)}</div>'


def plain(text: str) -> str:
    """An answer as text: real line breaks, every other control character visible."""
    return printable(text)


def final_html(text: str) -> str:
    """The finished answer, plain (cut at its first EOS, special tokens skipped)."""
    if not text:
        return (f'<div class="lad-final lad-empty" style="{BOX_STYLE}"><em>(empty answer: the model ended it at '
                'once)</em></div>')
    return f'<div class="lad-final" style="{BOX_STYLE}">{html.escape(plain(text))}</div>'


def placeholder_html(text: str) -> str:
    return f'<div class="lad-idle" style="{BOX_STYLE}color:#71717a;">{html.escape(text)}</div>'


def error_text(message: str) -> str:
    return f"**Error:** {message}"


def progress_text(label: str, step, iters: int | None) -> str:
    """`iters=None`: the AR parent, one step per generated token."""
    if iters is None:
        return f"{label}: {step.nfe} tokens"
    return f"{label}: step {step.iteration + 1}/{iters} · {step.nfe} forwards"


def summary_text(gen, ar=None) -> str:
    """Both timings, as `lad-generate --ar` prints them."""
    line = f"**LAD** ({gen.strategy}): {gen.forwards_text()}, {gen.seconds:.2f} s"
    if ar is not None:
        line += f" · **AR parent**: {ar.nfe} tokens, {ar.seconds:.2f} s"
    return line


# ---------------------------------------------------------------- settings → sampler options


def _number(name: str, value, low: float, high: float) -> float:
    if value is None or value == "":
        raise SettingsError(f"{name} is empty")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number) or not low <= number <= high:
        raise SettingsError(f"{name} must be between {low:g} and {high:g}, got {value}")
    return number


def _integer(name: str, value, low: int, high: int) -> int:
    number = _number(name, value, low, high)
    if number != int(number):
        raise SettingsError(f"{name} must be a whole number, got {value}")
    return int(number)


def _option(label: str, name: str, value):
    """A page setting checked against option `name`'s range (lad/sampling/options.py), capped by PAGE_HIGH."""
    spec = OPTIONS[name]
    high = min(spec.high if spec.high is not None else math.inf, PAGE_HIGH.get(name, math.inf))
    return (_integer if spec.kind is int else _number)(label, value, spec.low, high)


def sampler_options(strategy: str, iterations, max_new_tokens, noise_start, no_noise: bool, retention: str,
                    remask: str, temperature, seed, threshold, block_length, delay_eos: bool = False,
                    delay_repeats: bool = False, block_cache: bool = False, draft_length=DRAFT_LENGTH) -> dict:
    """The page's settings as keyword options of the strategy function; SettingsError names a bad one.

    `no_noise` ("disable intermediate noising") is refine's noise_start=0: noiseless refinement.
    `remask="default"` keeps the strategy's own default; `block_length` 0 means one block (the whole answer).
    `delay_eos` (confidence, threshold) commits EOS last, so an easy, confident EOS cannot end the answer early.
    `delay_repeats` (confidence, threshold): a mask predicting the word of the mask left of it waits for it.
    `block_cache` (confidence, threshold) freezes the rest of the answer's K/V while a block is decoded (faster,
    approximate; docs/sampling.md). `draft_length` (speculative): tokens drafted per round.
    """
    if strategy not in STRATEGIES:
        raise SettingsError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    options = {
        "iters": _option("iterations", "iters", iterations),
        "max_new_tokens": _option("max new tokens", "max_new_tokens", max_new_tokens),
        "noise_start": 0.0 if no_noise else _option("noise start", "noise_start", noise_start),
        "retention": retention,
        "temperature": _option("temperature", "temperature", temperature),
        "seed": _integer("seed", seed, 0, 2**32 - 1),  # the page's seed box: a plain non-negative number
        "threshold": _option("threshold", "threshold", threshold),
        "draft_length": _option("draft length", "draft_length", draft_length),
    }
    block = _integer("block length", block_length or 0, 0, options["max_new_tokens"])
    if block:
        if options["max_new_tokens"] % block:
            raise SettingsError(f"block length ({block}) must divide max new tokens ({options['max_new_tokens']})")
        options["block_length"] = block
    if remask != "default":
        options["remask"] = remask
    if delay_eos:
        options["delay_eos"] = True
    if delay_repeats:
        options["delay_repeats"] = True
    if block_cache:
        options["block_cache"] = True
    return options


def polish_passes(value) -> int:
    """Noiseless passes over the finished draft (any strategy's; lad/sampling/polish.py), not a strategy option."""
    return _option("polish passes", "polish", value or 0)


def pause_seconds(value) -> float:
    return _number("pause", value, 0, 10)
