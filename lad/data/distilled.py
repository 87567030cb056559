"""Recipe sources the AR parent answers (`distill:` on a data source), so a recipe trains on self-distilled data
with no separate step and no download.

Before the model for training loads, each such source is distilled once with the recipe's base model
(`lad.distill.distill`: batched, KV cache, resumable) into the LAD cache, under a name that is a digest of
everything the answers depend on: the base model, the prompts (their bytes), the generation settings, and the
recipe's `data.system_prompt` / `data.chat_template` (the prompt the parent answers is rendered exactly as
training will render it). A second run with the same recipe reads the cached file; an interrupted distillation
continues where it stopped. Answers cut at `max_new_tokens` are left out unless `keep_cut` (training would
append EOS at the cut). The source is then an ordinary `instruction` JSONL source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from ..recipe import DataSource, Recipe


def _prompts_digest(path: str) -> str:
    from ..distill import BUILTIN, builtin_prompts

    if path == BUILTIN:
        data = json.dumps([dataclasses.asdict(p) for p in builtin_prompts()]).encode()
    else:
        data = Path(path).expanduser().read_bytes()
    return hashlib.sha256(data).hexdigest()


def cache_file(source: DataSource, recipe: Recipe) -> Path:
    from ..modeling.load import cache_root

    key = {"model": recipe.model.name_or_path, "revision": recipe.model.revision, "dtype": recipe.model.dtype,
           "quantization": recipe.model.quantization, "prompts": _prompts_digest(source.path),
           "settings": {k: v for k, v in dataclasses.asdict(source.distill).items() if k != "keep_cut"}, "system_prompt": recipe.data.system_prompt,
           "chat_template": recipe.data.chat_template}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = "builtin" if source.path == "builtin" else Path(source.path).stem
    return cache_root(recipe.model) / "distill" / f"{name}-{digest}.jsonl"


def distill_sources(recipe: Recipe, sources: list[DataSource], *, run: bool = True) -> list[DataSource]:
    """`sources` with every distilled one replaced by its cached answers (distilled first when `run` and missing;
    with run=False, as on the non-main processes of a multi-process run, the files must exist by then)."""
    from ..distill import distill

    out = []
    for source in sources:
        if source.distill is None:
            out.append(source)
            continue
        target = cache_file(source, recipe)
        if run:
            target.parent.mkdir(parents=True, exist_ok=True)
            spec = source.distill
            chat_template = "auto" if recipe.data.chat_template == "auto" else recipe.data.chat_template
            distill(recipe.model, source.path, target, max_new_tokens=spec.max_new_tokens,
                    batch_size=spec.batch_size, sample=spec.sample, temperature=spec.temperature, top_p=spec.top_p,
                    seed=spec.seed, limit=spec.limit, system_prompt=recipe.data.system_prompt,
                    chat_template=chat_template, dtype=recipe.model.dtype)
        if not source.distill.keep_cut:
            target = finished_rows(target)
        out.append(dataclasses.replace(source, path=str(target), distill=None, fields={}))
    return out


def finished_rows(path: Path) -> Path:
    """A sibling file with only the answers that ended with EOS (written atomically; rebuilt when older than
    the answers): an answer cut at max_new_tokens would be trained as ending there."""
    done = path.with_name(path.stem + ".eos.jsonl")
    if done.is_file() and done.stat().st_mtime >= path.stat().st_mtime:
        return done
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("finish") == "eos"]
    tmp = done.with_name(f".{done.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, done)
    return done
