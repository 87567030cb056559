"""`key=value` overrides of a recipe (nanoGPT style): dotted keys for nested sections, list items by index.

`noise.objective=structural`, `data.train.0.path=my.jsonl` (an index one past the end appends an item). Values are
read as YAML scalars by `lad.schema.read_yaml`; text that is not YAML is taken as it was typed.
"""

from __future__ import annotations

from typing import Any

import yaml

from .schema import RecipeError, YAMLRefused, read_yaml


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise RecipeError(f"override {item!r}: empty key")
    try:
        value = read_yaml(raw) if raw != "" else ""
    except YAMLRefused as err:
        raise RecipeError(f"override {item!r}: {err.what}") from None
    except yaml.YAMLError:  # not YAML: the text itself, e.g. `data.system_prompt=Answer: [briefly`
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise RecipeError(f"{'.'.join(path)}: no list item {part}")
            if int(part) == len(node):  # a new item, as for the last key below
                node.append([] if nxt.isdigit() else {})
            node = node[int(part)]
            continue
        if node.get(part) is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise RecipeError(f"{'.'.join(path)}: no list item {last}")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value
