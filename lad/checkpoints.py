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


from .atomic import match_modes, staged, write_json
from .run import CHECKPOINTS, LadInfo, RunDirError, check_safetensors

log = logging.getLogger("lad.run")


def save_weights(model, folder: Path) -> None:
    """PEFT adapter (adapter_*.safetensors) or, for full fine-tuning, the whole model as safetensors. PEFT's
    empty model-card template ("Model Card for Model ID") is replaced by a card that says what the folder is."""
    model.save_pretrained(folder, safe_serialization=True)
    if (Path(folder) / "README.md").is_file() and hasattr(model, "peft_config"):  # PEFT's template: ours instead
        (Path(folder) / "README.md").write_text(adapter_card(model), encoding="utf-8")
    match_modes(Path(folder))


def adapter_card(model) -> str:
    """README.md of a run (and of its best/ and checkpoint folders): what the adapter is and how to load it; the
    base is named only by its hub id, never by a path of this machine (lad.json keeps the full reference)."""
    import yaml

    from .modeling.locate import looks_local

    config = next(iter(getattr(model, "peft_config", {}).values()), None)
    base = getattr(config, "base_model_name_or_path", None) or ""
    hub = base if base and not base.startswith("pkg://") and not looks_local(base) else None
    meta = {"library_name": "peft", "pipeline_tag": "text-generation",
            "tags": ["lad", "diffusion-language-model", "lora"], **({"base_model": hub} if hub else {})}
    return "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        "# A LAD run: LoRA adapter for a diffusion language model", "",
        f"A LoRA adapter that LAD trained to turn {f'`{hub}`' if hub else 'its base model'} into a diffusion language "
        "model: attention is bidirectional and the model fills in masked answer tokens over several iterations. "
        "`lad.json` holds the base, the mask token and `shift`; `recipe.yaml` the settings it trained with.", "",
        "It is not a left-to-right model: load it with LAD, not `generate()`.", "", "```bash",
        'lad-generate --model RUN_DIR --prompt "What is the capital of France?"',
        "lad export RUN_DIR --out MODEL_DIR      # one standalone folder, adapter merged, with a full model card",
        "```", "", "```python", "from lad.run import load_run",
        'denoiser, tokenizer, info = load_run("RUN_DIR")   # base + adapter + lad.json', "```", ""])


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


def load_checkpoint_state(folder: Path, *, model, optimizer, scheduler, verified: bool = False) -> dict:
    """Restore weights, optimizer and scheduler from `folder`; returns its state.json. verified: the caller
    already read every file's bytes (`resume.plan_resume` does, before anything loads), so they are not read
    twice."""
    problem = checkpoint_problem(folder)
    if problem:
        raise RunDirError(f"checkpoint {folder} is unusable: {problem}")
    problem = None if verified else checkpoint_files_problem(folder)  # same sizes, other bytes (lad/integrity.py)
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
