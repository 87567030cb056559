"""Terminal view of a sampler's steps: pure string rendering plus a small in-place redrawing view.

`render_step` draws one `Step` as text: each answer slot's token decoded on its own, masked slots as a red
`░`, slots that changed this iteration in green, the first EOS and everything after it dimmed (hidden
without colour). Control characters are made visible (newline `↵`, others as Unicode control pictures), so
one answer is always one line of text and raw bytes cannot drive the terminal.
`LiveView` is an `on_step` callback that prints the rows of a batch and redraws them in place.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import unicodedata

from .common import Step

RED, GREEN, DIM, RESET = "\x1b[31m", "\x1b[32m", "\x1b[2m", "\x1b[0m"
MASK_GLYPH = "░"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def visible(piece: str) -> str:
    """A decoded token with control characters replaced by visible stand-ins."""
    out = []
    for ch in piece:
        if ch == "\n":
            out.append("↵")
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))  # ␀ ... ␟ (Unicode control pictures)
        elif ch == "\x7f":
            out.append("␡")
        elif 0x80 <= ord(ch) < 0xA0:
            out.append("�")
        else:
            out.append(ch)
    return "".join(out)


def decode_pieces(tokenizer, ids: list[int], cache: dict[int, str] | None = None) -> list[str]:
    """Each id decoded alone (a byte-level piece of a multi-byte character decodes as `�`)."""
    cache = {} if cache is None else cache
    for t in ids:
        if t not in cache:
            cache[t] = tokenizer.decode([t])
    return [cache[t] for t in ids]


def render_step(step: Step, tokenizer, mask_id: int, color: bool = True, eos_ids: set[int] | None = None,
                cache: dict[int, str] | None = None) -> str:
    eos_ids = {tokenizer.eos_token_id} if eos_ids is None else eos_ids
    pieces = decode_pieces(tokenizer, step.tokens, cache)
    out, after_eos = [], False
    for token, piece, masked, changed in zip(step.tokens, pieces, step.masked, step.changed):
        after_eos = after_eos or (not masked and token in eos_ids)
        if after_eos and not color:
            break
        text = MASK_GLYPH if masked else visible(piece)
        if not color:
            out.append(text)
            continue
        codes = "31" if masked else "32" if changed else ""
        if after_eos and not masked:
            codes = f"2;{codes}" if codes else "2"
        out.append(f"\x1b[{codes}m{text}{RESET}" if codes else text)
    return "".join(out)


def display_width(text: str) -> int:
    """Terminal columns `text` takes (ANSI codes take none, wide East Asian characters two)."""
    plain = _ANSI.sub("", text)
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1
               for ch in plain)


def count_lines(text: str, columns: int) -> int:
    """Terminal lines `text` (plus its final newline) occupies, wrapping at `columns`."""
    return sum(max(1, -(-display_width(line) // max(columns, 1))) for line in text.split("\n"))


class LiveView:
    """`on_step` callback: one line per prompt, redrawn in place (or appended, one block per step).

    redraw=None redraws when `stream` is a terminal. `labels` prefix each row (e.g. prompt numbers);
    `iters` is shown as the step total; `pause` sleeps after each step so a person can follow.
    """

    def __init__(self, tokenizer, mask_id: int, *, stream=None, color: bool = True, redraw: bool | None = None,
                 pause: float = 0.0, iters: int | None = None, labels: list[str] | None = None,
                 eos_ids: set[int] | None = None):
        self.tokenizer, self.mask_id, self.color, self.pause = tokenizer, mask_id, color, pause
        self.stream = stream or sys.stdout
        self.redraw = self.stream.isatty() if redraw is None else redraw
        self.iters, self.labels, self.eos_ids = iters, labels, eos_ids
        self.lines, self.cache = 0, {}

    def reset(self, labels: list[str] | None = None) -> None:
        """Start a new block (the next batch): the previous one stays on screen."""
        self.lines, self.labels = 0, labels

    def frame(self, steps: list[Step]) -> str:
        first = steps[0]
        total = f"/{self.iters}" if self.iters else ""
        header = f"step {first.iteration + 1}{total} · {first.nfe} NFE"
        rows = [render_step(s, self.tokenizer, self.mask_id, self.color, self.eos_ids, self.cache) for s in steps]
        if self.labels or len(rows) > 1:
            labels = self.labels or [f"[{i + 1}]" for i in range(len(rows))]
            rows = [f"{label} {row}" for label, row in zip(labels, rows)]
        if not self.redraw and len(rows) == 1:
            return f"{header} │ {rows[0]}"
        return "\n".join([header, *rows])

    def __call__(self, steps: list[Step]) -> None:
        text = self.frame(steps)
        if self.redraw and self.lines:
            self.stream.write(f"\x1b[{self.lines}F\x1b[J")  # up to the block's first line, clear below
        self.stream.write(text + "\n")
        self.stream.flush()
        self.lines = count_lines(text, shutil.get_terminal_size().columns)
        if self.pause > 0:
            time.sleep(self.pause)
