"""Plain data → typed dataclasses: the machinery under `lad.recipe`, with no recipe keys of its own.

- `read_yaml(text)`: `yaml.safe_load` (no Python tags), plus two refusals that safe_load lets through: a key
  repeated in one mapping (safe_load silently keeps the last one), and aliases that expand a document past
  `MAX_NODES` values (a "billion laughs" document) or into itself.
- `build(cls, data)`: a dataclass from a mapping, every value checked against its annotation, unknown keys
  refused with the closest known key, then the dataclass's own `validate()`.
- `Range`: the interval a numeric key must lie in; a dataclass lists its keys' ranges in `RANGES` and calls
  `check_ranges(self)` from `validate()`. `str(range)` is the rule as messages and docs/recipe.md write it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe problem: the message names the file and the key."""


# ---------------------------------------------------------------- YAML

MAX_NODES = 10_000  # values of a document with its aliases expanded; a recipe has about 100
_MERGE = "tag:yaml.org,2002:merge"


class YAMLRefused(yaml.MarkedYAMLError):
    """A document yaml.safe_load would accept that a recipe must not be: a repeated key, an alias bomb."""

    def __init__(self, what: str, mark: yaml.Mark, where: str = ""):
        super().__init__(problem=what + where, problem_mark=mark)
        self.what = what  # without `where`, a note on lines that means nothing in a one-line override


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated keys and counts every value as if each alias were written out."""

    def __init__(self, stream):
        super().__init__(stream)
        self._expanded = 0  # values composed so far, aliases counted at their target's full size
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded, once composed

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:  # else safe_load's own "found undefined alias"
                if id(target) not in self._sizes:
                    raise YAMLRefused(f"alias *{event.anchor} refers to a value that contains it", event.start_mark)
                self._count(self._sizes[id(target)], event.start_mark)
            return super().compose_node(parent, index)
        start = self._expanded
        node = super().compose_node(parent, index)
        self._count(1, node.start_mark)
        self._sizes[id(node)] = self._expanded - start
        return node

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._expanded += n
        if self._expanded > MAX_NODES:
            raise YAMLRefused(f"aliases expand this document past {MAX_NODES} values (an alias bomb?); write "
                              f"the values out or use fewer aliases", mark)

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:  # `<<: *base` then a key overrides base
                first = seen.setdefault((key.tag, key.value), key)
                if first is not key:
                    raise YAMLRefused(f"duplicate key {key.value!r}", key.start_mark,
                                      f" (first on line {first.start_mark.line + 1})")
        return node


def read_yaml(text: str) -> Any:
    """`yaml.safe_load(text)` with StrictLoader's refusals (raised as `YAMLRefused`, a `yaml.YAMLError`)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ---------------------------------------------------------------- numeric ranges


@dataclass(frozen=True)
class Range:
    low: float
    high: float = math.inf
    low_open: bool = False  # low itself is outside
    high_open: bool = False

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def check(self, key: str, value: Any) -> None:
        """Raise `ValueError("KEY: must be ..., got X")` unless `value` is a finite number in the range."""
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {value}")
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if not (above and below):
            raise ValueError(f"{key}: must be {self}, got {value}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, low_open=True)
SEED = Range(0, 2**32 - 1)  # what numpy (and so accelerate's set_seed) accepts


def check_ranges(obj: Any) -> None:
    """Check every key `obj.RANGES` names, in order."""
    for key, rule in obj.RANGES.items():
        rule.check(key, getattr(obj, key))


# ---------------------------------------------------------------- building a dataclass from plain data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    options = typing.get_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(f"{key}: must not be empty")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(value, option, key)
        except RecipeError as err:
            errors.append(str(err))
    raise RecipeError(errors[-1]) if len(errors) == 1 else RecipeError(
        f"{key}: expected {' or '.join(_type_name(o) for o in options if o is not type(None))}, got {value!r}")


def _convert_literal(value: Any, tp: Any, key: str) -> Any:
    choices = typing.get_args(tp)
    if value in choices and type(value) is type(next(c for c in choices if c == value)):
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is bool:
        raise RecipeError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int:
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float:
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if tp is str and isinstance(value, str):
        return value
    if tp is str:
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    raise RecipeError(f"{key}: unsupported type {tp}")  # pragma: no cover - a schema bug


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is ambiguous (1e-4 is a str)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin is Literal:
        return _convert_literal(value, tp, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return value
    return _convert_scalar(value, tp, key)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion, then `validate()` it."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown key {full!r}{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    for name in names:  # a section left out is validated too (a recipe without `model:` has no model)
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], {}, f"{prefix}.{name}" if prefix else name)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except RecipeError:
            raise
        except ValueError as err:
            raise RecipeError(f"{prefix + '.' if prefix else ''}{err}") from None
    return obj
