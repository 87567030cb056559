"""What a training run holds: `Run`, the objects setup built once, and `TrainState`, the counters that change each
step and that a checkpoint carries so a resumed run continues exactly (bitwise) where it stopped."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from lad.data import Example
from lad.recipe import Recipe
from lad.resume import ResumePlan, apply_changes
from lad.checkpoints import load_checkpoint_state, save_checkpoint
from lad.run import LadInfo

from .data import Schedule, TokenIds
from .metrics import Metrics

log = logging.getLogger("lad.finetune")  # the whole recipe logs under one name


@dataclass
class Run:
    """Everything setup built; the loop, validation and saving read it and never replace it."""

    recipe: Recipe
    accelerator: object
    denoiser: object  # as `accelerator.prepare` returned it (DDP-wrapped on several processes)
    optimizer: object
    scheduler: object
    tokenizer: object
    ids: TokenIds
    train_set: list[Example]
    val_set: list[Example]
    schedule: Schedule
    info: LadInfo  # lad.json as training writes it (its step set at each save)
    out: Path
    metrics: Metrics

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        """The Denoiser itself (its `.model`: the PEFT or full model whose weights are saved)."""
        return self.accelerator.unwrap_model(self.denoiser)


@dataclass
class TrainState:
    """The counters of a run: the step finished last and what has to survive a resume with it."""

    step: int = 0
    best_val: float = math.inf
    tokens_seen: int = 0
    skipped: int = 0  # non-finite steps skipped so far (the recipe's skip_bad_steps allows some)
    digest: str = ""  # of the training and validation data: a resume must see the same

    def progress(self) -> dict:
        """What a checkpoint's state.json carries besides the step."""
        return {"best_val": self.best_val, "tokens": self.tokens_seen, "skipped_steps": self.skipped,
                "data_digest": self.digest}


def restore(plan: ResumePlan, recipe: Recipe, denoiser, optimizer, scheduler, digest: str) -> TrainState:
    """The state to start from: a fresh one, or the checkpoint's, with its weights, optimizer and scheduler loaded
    and the optimisation settings the resume may change applied on top."""
    if plan.checkpoint is None:
        return TrainState(digest=digest)
    saved = load_checkpoint_state(plan.checkpoint, model=denoiser.model, optimizer=optimizer, scheduler=scheduler,
                                  verified=True)  # plan_resume checked every file's bytes
    state = TrainState(step=saved["step"], best_val=saved.get("best_val", math.inf),
                       tokens_seen=saved.get("tokens", 0), skipped=saved.get("skipped_steps", 0), digest=digest)
    apply_changes(plan, optimizer, scheduler, recipe)
    changed = "; ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in plan.changes.items())
    log.info("resumed from %s at step %d%s", plan.checkpoint, state.step, f" (changed: {changed})" if changed else "")
    return state


def checkpoint(run: Run, state: TrainState) -> Path:
    """A resumable checkpoint of the step just finished (main process only)."""
    return save_checkpoint(run.out, state.step, model=run.unwrapped.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, state=state.progress(), info=run.info,
                           keep=run.recipe.keep_checkpoints)
