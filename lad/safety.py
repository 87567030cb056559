"""Where LAD may write: the one place that decides whether a path may be created or replaced.

LAD never deletes or overwrites what it did not write. Every writer (`lad-finetune`'s output_dir and resume,
`lad export --out`, `lad distill --out`, `lad-eval --output_path`) asks `check_destination` before anything
loads, and `replace_folder` asks it again right before deleting. A folder may be replaced only when it holds
nothing but what LAD writes into an artefact of the same kind (a run, an export), and never when it is the
current directory, the home directory, a filesystem root, a parent of the current directory, or a folder
inside a run or an export — `overwrite` or not. Paths are normalised first: `~` expanded, an empty path
refused, symlinks resolved, so the decision is made about the folder that would really be deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

RUN, EXPORT, EVAL, FILE = "run", "export", "eval", "file"  # what a writer puts at the destination

_TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"}
_WEIGHTS = {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
            "config.json", "generation_config.json"}
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")
_STAGING = re.compile(r"\.(tmp|old)-.+|\..+\.tmp$")  # run.staging_dir / commit_folder / write_json leftovers
OWN_NAMES = {  # every name LAD writes at the top of an artefact of each kind
    RUN: _TOKENIZER | _WEIGHTS | {"lad.json", "recipe.yaml", "metrics.jsonl", "report.json", "README.md",
                                  "train.log", "base", "best", "checkpoints", "eval", "lad"},  # lad/: trackers
    EXPORT: _TOKENIZER | _WEIGHTS | {"lad.json", "recipe.yaml", "README.md"},
}


class PathError(ValueError):
    """A destination LAD must not write to (one line naming the flag as typed and the path)."""


def normalised(raw: str | os.PathLike | None, flag: str) -> Path:
    """`raw` with `~` expanded and symlinks resolved; an empty path (an unset shell variable) is refused."""
    text = os.fspath(raw) if raw is not None else ""
    if not text.strip():
        raise PathError(f"{flag}: empty path (an unset shell variable?); name a folder")
    return Path(os.path.expanduser(text)).resolve()


def artefact_kind(folder: Path) -> str | None:
    """RUN or EXPORT when `folder` is recognisably one LAD wrote, else None."""
    info = folder / "lad.json"
    if info.is_file():
        try:
            merged = json.loads(info.read_text(encoding="utf-8")).get("merged", False)
        except (OSError, ValueError, AttributeError):
            merged = False
        return EXPORT if merged is True else RUN
    recipe = folder / "recipe.yaml"
    if _run_recipe(recipe) or _lad_checkpoints(folder) or (recipe.is_file() and (folder / "metrics.jsonl").is_file()):
        return RUN  # a run that stopped before its first lad.json (names other tools use too need LAD's content)
    return None


def _lad_checkpoints(folder: Path) -> bool:
    """A LAD checkpoint (`checkpoints.list_checkpoints`: step-N) holding LAD's state.json or lad.json; other tools
    name folders `checkpoints` too."""
    from .checkpoints import list_checkpoints

    return any((step / "state.json").is_file() or (step / "lad.json").is_file() for step in list_checkpoints(folder))


RUN_HEADER = "# lad-finetune run recipe"  # the first line of a run's recipe.yaml, written when the folder is made


def run_header() -> str:
    from . import __version__

    return f"{RUN_HEADER} (LAD {__version__}): the settings this run trained with"


def _run_recipe(path: Path) -> bool:
    """A recipe.yaml that lad-finetune wrote into a run (a user's own recipe.yaml does not start so)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().startswith(RUN_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def enclosing_artefact(path: Path) -> Path | None:
    """The run or export that `path` lies inside, if any."""
    for parent in path.parents:
        if artefact_kind(parent) is not None:
            return parent
    return None


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """Names at the top of `folder` that LAD does not write into an artefact of `kind`."""
    own = OWN_NAMES[kind]
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in own and not _SHARD.match(p.name) and not _STAGING.match(p.name))


def protected_reason(path: Path) -> str | None:
    """Why `path` may never be replaced, whatever it holds."""
    cwd = Path.cwd().resolve()
    if path.parent == path:
        return "a filesystem root"
    if path == Path.home().resolve():
        return "the home directory"
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "a parent of the current directory"
    return None


def check_parents(path: Path, flag: str, raw) -> None:
    """The folders above `path` can hold it: none is a regular file, and the nearest existing one is writable."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise PathError(f"{flag} {raw}: {parent} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {raw}: {existing} is not writable (read-only filesystem or no permission)")
    if existing == path and not existing.is_dir() and not os.access(existing, os.W_OK):
        raise PathError(f"{flag} {raw}: {existing} is not writable (read-only filesystem or no permission)")


def check_destination(raw, *, kind: str, flag: str, overwrite: bool = False, resuming: bool = False) -> Path:
    """The normalised destination for an artefact of `kind`, or a PathError saying why LAD may not write there.

    A missing path may be created unless it lies inside a run or export (EVAL may: `RUN/eval`). An existing
    folder that holds files is accepted when resuming a run it holds, or with `overwrite` when it is an artefact
    of the same kind holding only what LAD writes, outside every protected place. FILE and EVAL destinations are
    files LAD creates or appends to; their content is the writer's to check."""
    path = normalised(raw, flag)
    check_parents(path, flag, raw)
    if kind in (FILE, EVAL) and (kind == FILE or path.suffix == ".json"):
        if path.is_dir():
            raise PathError(f"{flag} {raw}: is a folder, not a file")
        for target in (path, path.with_suffix(".md")) if kind == EVAL else ():  # lad-eval writes both
            if target.exists():
                raise PathError(f"{flag} {raw}: {target.name} already exists; choose another file (lad-eval never "
                                "overwrites results)")
        return path
    if path.exists() and not path.is_dir():
        raise PathError(f"{flag} {raw} exists and is not a folder")
    outer = enclosing_artefact(path)
    if kind in (RUN, EXPORT) and outer is not None:
        raise PathError(f"{flag} {raw}: lies inside the LAD {artefact_kind(outer)} {outer}; choose a folder outside it")
    if kind == EVAL or not path.exists() or not any(path.iterdir()):
        return path
    found = artefact_kind(path)
    if resuming:
        if found != RUN:
            raise PathError(f"{flag} {raw}: not a LAD run (no lad.json, recipe.yaml or checkpoints/), so there is "
                            "nothing to resume; choose the run's folder")
        return path
    what = f"a LAD {found}" if found else "files"
    hint = {RUN: "pass overwrite=true to replace it, resume_from=latest to continue it, or choose another output_dir",
            EXPORT: "pass --overwrite to replace it, or choose another folder"}[kind]
    if not overwrite:
        raise PathError(f"{flag} {raw} already holds {what}: {hint if found == kind else 'choose another folder'}")
    refusal = replace_refusal(path, kind)
    if refusal:
        raise PathError(f"{flag} {raw}: {refusal}; LAD never replaces it, overwrite or not")
    return path


def replace_refusal(path: Path, kind: str) -> str | None:
    """Why the existing folder `path` may not be replaced by an artefact of `kind` (None: it may)."""
    protected = protected_reason(path)
    if protected:
        return f"it is {protected}"
    found = artefact_kind(path)
    if found is not None and found != kind:
        return f"it is a LAD {found}, not a LAD {kind}"
    foreign = foreign_entries(path, kind) if found else sorted(p.name for p in path.iterdir())
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"it holds files LAD did not write ({foreign[0]}{more})"
    return None


def replace_folder(path: Path, kind: str) -> None:
    """Delete `path` (a LAD artefact of `kind`, about to be written anew), checked once more right before."""
    refusal = replace_refusal(path, kind)
    if refusal:
        raise PathError(f"{path}: {refusal}; not deleted")
    shutil.rmtree(path)
