"""An option declared once: its type, valid range, help and default, from which a CLI flag, its range check and
the Python API's check all come (lad/sampling/options.py holds the samplers' table, lad/scoring/options.py the
scorers'), so a flag, an lm-eval `--model_args` key and a keyword argument say and accept the same thing."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

NONE_WORDS = ("", "none")  # a model_args string meaning "not set": the default


@dataclass(frozen=True)
class Option:
    kind: type  # int | float | str | bool
    help: str
    low: float | None = None  # smallest valid value (inclusive unless low_open)
    high: float | None = None  # largest valid value (inclusive)
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    negatable: bool = False  # a bool with a --no- form (its default is decided elsewhere, e.g. by the run)
    rule: str | None = None  # says the range in words where the bounds alone would not
    metavar: str | None = None
    default: object = None  # the value when not given (None: decided elsewhere, or "not set")
    none_word: str | None = None  # a model_args word that also means None (e.g. iters=exact)

    def range_text(self) -> str:
        if self.rule:
            return self.rule
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def problem(self, value) -> str | None:
        """Why `value` is not valid for this option (None when it is); NaN is never valid."""
        if self.choices is not None:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind is str:
            return None if isinstance(value, str) else f"must be a string, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                self.kind is int and not (math.isfinite(value) and value == int(value)):
            return f"must be {'a whole number' if self.kind is int else 'a number'}, got {value!r}"
        if self.low is None:
            return None
        if math.isnan(value):
            return f"must be {self.range_text()}, got {value}"
        below = value <= self.low if self.low_open else value < self.low
        if below or (self.high is not None and value > self.high):
            return f"must be {self.range_text()}, got {value}"
        return None

    def parse(self, value):
        """A value as lm-eval's `--model_args` hands it over (strings, or numbers, booleans and None it
        recognised), turned into this option's kind: None, "" and "none" mean the default, `none_word` None; a
        value that does not convert is returned as it is, for `problem`."""
        if value is None:
            return self.default
        if not isinstance(value, str):
            return self._number(value)
        if self.choices is not None and value in self.choices:  # e.g. baseline=none is a choice, not "not set"
            return value
        word = value.strip().lower()
        if word in NONE_WORDS:
            return self.default
        if word == self.none_word:
            return None
        if self.kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(word, value)
        if self.kind in (int, float):
            try:
                return self.kind(word)
            except ValueError:
                return value
        return value

    def _number(self, value):
        """A number of this option's kind where it is one exactly (4.0 for an int option is 4), else as it is."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return value
        if self.kind is float:
            return float(value)
        return int(value) if self.kind is int and value == int(value) else value


def flag(name: str) -> str:
    """An option's command-line flag: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def value_problem(table: dict[str, Option], name: str, value, label: str | None = None) -> str | None:
    """One line saying why `value` is not valid for option `name` ("--iters must be >= 1, got 0"), else None.
    None is always valid: it means "not given"."""
    why = table[name].problem(value) if value is not None else None
    return f"{label or name} {why}" if why else None


def add_flags(group, table: dict[str, Option], names, defaults: dict | None = None) -> None:
    """Add the flag of each option in `names` to an argparse group, typed and explained by its entry. The default
    is the entry's own unless `defaults` says otherwise (None: "not given", the callee decides)."""
    defaults = defaults or {}
    for name in names:
        spec = table[name]
        common = {"default": defaults.get(name, spec.default), "help": spec.help}
        if spec.kind is bool and spec.negatable:
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, **common)
        elif spec.kind is bool:
            group.add_argument(flag(name), action="store_const", const=True, **common)
        else:
            group.add_argument(flag(name), type=spec.kind, choices=spec.choices, metavar=spec.metavar, **common)
