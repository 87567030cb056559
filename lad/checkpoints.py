"""Checkpoints: `checkpoints/step-NNNNNN/` with the trainable weights, optimizer, scheduler, lad.json and
state.json (file sizes recorded), written atomically; a partial or corrupt one is detected and skipped."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch

from .integrity import checkpoint_files_problem


from .atomic import staged, write_json
from .run import CHECKPOINTS, LadInfo, RunDirError, check_safetensors

log = logging.getLogger("lad.run")


def save_weights(model, folder: Path) -> None:
    """PEFT adapter (adapter_*.safetensors) or, for full fine-tuning, the whole model as safetensors."""
    model.save_pretrained(folder, safe_serialization=True)


def save_checkpoint(output_dir: Path, step: int, *, model, optimizer, scheduler, state: dict, info: LadInfo,
                    keep: int) -> Path:
    final = output_dir / CHECKPOINTS / f"step-{step:06d}"
    with staged(final) as tmp:
        save_weights(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        dataclasses.replace(info, step=step).save(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / "state.json", {**state, "step": step, "files": files})
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))  # by number: step-1000000 is newer than step-999999


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be used, or None when it is complete."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        return "no state.json (interrupted while saving?)"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "state.json is corrupt"
    for name, size in state.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint; broken ones are reported and skipped."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def load_checkpoint_state(folder: Path, *, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and scheduler from `folder`; returns its state.json."""
    problem = checkpoint_problem(folder)
    if problem:
        raise RunDirError(f"checkpoint {folder} is unusable: {problem}")
    problem = checkpoint_files_problem(folder)  # same sizes, other bytes (lad/integrity.py)
    if problem:
        raise RunDirError(problem + OLDER)
    load_trainable_weights(model, folder)
    for name, part in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        path = folder / name
        try:
            saved = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError):
            raise RunDirError(f"{path}: not a readable PyTorch file, truncated or corrupt{OLDER}") from None
        try:
            part.load_state_dict(saved)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RunDirError(f"{path}: does not fit this run's {name[:-3]} ({why}); was the checkpoint written "
                              "with another recipe?") from None
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))


OLDER = "; resume from an older checkpoint (resume_from=PATH)"


def load_trainable_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        check_safetensors(adapter)
        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RunDirError(f"{adapter}: weights do not match the model ({unexpected[:3]} ...)")
        return
    full = folder / "model.safetensors"
    if not full.is_file():
        raise RunDirError(f"{folder}: no adapter_model.safetensors or model.safetensors")
    check_safetensors(full)
    model.load_state_dict(load_file(full), strict=False)
