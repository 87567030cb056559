"""Resuming a run, safely and honestly.

`plan_resume` runs before any model loads. It refuses a folder that is not a LAD run, finds the checkpoint to
continue from, and compares the recipe with the run's saved `recipe.yaml`:

- settings that change the model's shape, the data or what is learnt (base model, LoRA, mask token, attention,
  shift, data sources, noise, seed, ...) are refused, the differing keys named;
- bookkeeping (max_steps, epochs, eval/save/log cadence, reports) is applied;
- optimisation settings (TUNABLE: learning rate, schedule, batch shape) are applied only when named with
  `--allow-change KEY`.

Every applied change is logged, written to `metrics.jsonl` (`{"step": N, "resumed_from": ..., "changes": ...}`)
and kept as a comment line in the run's `recipe.yaml`, so no setting is ever ignored silently. A checkpoint
also records a digest of the encoded training and validation examples: a data file edited since is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .integrity import checkpoint_files_problem
from .checkpoints import checkpoint_problem, latest_checkpoint, list_checkpoints
from .run import LadInfo, RunDirError

log = logging.getLogger("lad.resume")

FREE = ("max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "log_every", "report_to", "report",
        "skip_bad_steps", "gradient_checkpointing", "model.cache_dir")
INVOCATION = ("resume_from", "overwrite", "output_dir")  # how this command was called, not what the run is
TUNABLE = ("optim.lr", "optim.weight_decay", "optim.scheduler", "optim.warmup_steps", "optim.grad_clip",
           "batch_size", "grad_accum")
HISTORY = "# resumed at step"  # recipe.yaml's comment lines that record each resume's changes


class NothingToDo(Exception):
    """The run is already at (or past) the requested number of steps: nothing is trained or written."""


@dataclass
class ResumePlan:
    checkpoint: Path | None  # None: no usable checkpoint yet, the run starts at step 0
    step: int = 0
    state: dict = field(default_factory=dict)  # the checkpoint's state.json
    changes: dict = field(default_factory=dict)  # dotted key -> [value in the run, value now]


def flat(data, prefix: str = "") -> dict:
    """{'optim.lr': 3e-4, 'data.train.0.path': ...}: every leaf of a nested recipe under its dotted key."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and data:
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    out: dict = {}
    for key, value in items:
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _under(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def recipe_changes(saved: dict, now: dict, allow: tuple[str, ...] = ()) -> dict:
    """The keys whose value differs; a RunDirError naming every change that may not be made on resume."""
    before, after = flat(saved), flat(now)
    changes = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
               if k in before and before.get(k) != after.get(k)  # keys a newer LAD added are not compared
               and not _under(k, INVOCATION)}
    fixed = [k for k in changes if not _under(k, FREE) and not _under(k, TUNABLE)]
    unlisted = [k for k in changes if _under(k, TUNABLE) and not _under(k, allow)]
    if fixed:
        shown = "; ".join(f"{k}: {changes[k][0]!r} in the run, {changes[k][1]!r} now" for k in fixed[:3])
        more = f" (and {len(fixed) - 3} more)" if len(fixed) > 3 else ""
        raise RunDirError(f"resume: the recipe changes what the run is ({shown}{more}); resume with the run's own "
                          "recipe.yaml, or start a new run in another output_dir")
    if unlisted:
        raise RunDirError(f"resume: {unlisted[0]} changes from {changes[unlisted[0]][0]!r} to "
                          f"{changes[unlisted[0]][1]!r}; pass --allow-change {unlisted[0]} to apply it on resume")
    return changes


def saved_recipe(out: Path) -> dict:
    path = out / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise RunDirError(f"{path}: unreadable; LAD wrote it, so the run folder was edited by hand") from None
    return data if isinstance(data, dict) else {}


def plan_resume(recipe, out: Path, now: dict, allow: tuple[str, ...] = ()) -> ResumePlan:
    """Which checkpoint to continue from and which recipe changes to apply (`now`: the recipe as a dict)."""
    if recipe.resume_from == "latest":
        folder = latest_checkpoint(out) if out.is_dir() else None
        if folder is None:
            log.warning("resume_from=latest: no usable checkpoint in %s, starting from step 0", out)
            return ResumePlan(None)
    else:
        folder = Path(recipe.resume_from).expanduser().resolve()
        problem = checkpoint_problem(folder)
        if problem:
            raise RunDirError(f"resume_from {recipe.resume_from}: not a usable checkpoint ({problem})")
    damaged = checkpoint_files_problem(folder)  # same sizes as recorded, other bytes: found before anything loads
    if damaged:
        older = [c for c in list_checkpoints(folder.parent) if c != folder and checkpoint_problem(c) is None]
        hint = f"resume_from={older[-1]}" if older else "no older checkpoint is usable: start a new run"
        raise RunDirError(f"resume: {damaged}; resume from an older checkpoint ({hint})")
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    run = folder.parent.parent if folder.parent.name == "checkpoints" else out
    changes = recipe_changes(saved_recipe(run), now, allow)
    return ResumePlan(folder, int(state["step"]), state, changes)


def check_progress(plan: ResumePlan, total_steps: int, out: Path) -> None:
    """NothingToDo when the checkpoint already reached `total_steps` and the run finished (or went past it)."""
    if plan.checkpoint is None or plan.step < total_steps:
        return
    if plan.step > total_steps:
        raise NothingToDo(f"{out} is at step {plan.step}, past max_steps {total_steps}: nothing to do, the run is "
                          "unchanged (raise max_steps to train further)")
    try:
        finished = LadInfo.load(out).step == total_steps
    except (OSError, RunDirError):  # no (readable) lad.json: the run did not finish
        finished = False
    if finished:
        raise NothingToDo(f"{out} already finished its {total_steps} steps: nothing to do (raise max_steps to "
                          "train further)")


def data_digest(*example_sets) -> str:
    """A digest of the encoded examples (prompt and answer ids, in order): the data a checkpoint trained on."""
    digest = hashlib.sha256()
    for examples in example_sets:
        for example in examples:
            digest.update(json.dumps([example.prompt_ids, example.answer_ids]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def check_data(plan: ResumePlan, digest: str) -> None:
    saved = plan.state.get("data_digest")
    if saved is not None and saved != digest:
        raise RunDirError(f"resume: the training data differ from those {plan.checkpoint} was trained on (a data "
                          "file or the tokenizer changed since); restore them, or start a new run")


def apply_changes(plan: ResumePlan, optimizer, scheduler, recipe) -> None:
    """Make the optimizer and scheduler restored from the checkpoint follow the recipe's changed settings."""
    if not plan.changes:
        return
    scheduler.base_lrs = [recipe.optim.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = recipe.optim.lr
        group["lr"] = recipe.optim.lr * factor(scheduler.last_epoch)  # the new schedule at the current step
        group["weight_decay"] = recipe.optim.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def history_lines(out: Path, plan: ResumePlan | None) -> list[str]:
    """recipe.yaml's earlier resume comments, plus this resume's when it changed anything."""
    path = out / "recipe.yaml"
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith(HISTORY)] \
        if path.is_file() else []
    if plan and plan.changes:
        changed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in plan.changes.items())
        kept.append(f"{HISTORY} {plan.step} from {plan.checkpoint.name}: {changed}")
    return kept
