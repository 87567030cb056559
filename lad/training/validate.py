"""Validation during training: loss and accuracy under noise that is the same at every evaluation and in every
run, so curves compare across steps and runs; the weights with the best validation loss are kept in best/."""

from __future__ import annotations

import dataclasses
import logging

import torch

from lad.data import Example
from lad.loss import LossStats
from lad.noise import validation_levels
from lad.recipe import Recipe
from lad.atomic import staged
from lad.checkpoints import save_weights

from .data import TokenIds, make_batch, replacement_pool, seed_for
from .state import Run, TrainState
from .step import batch_loss

log = logging.getLogger("lad.finetune")  # the whole recipe logs under one name

VALIDATION_SEED = 20250101  # fixed, not the run's seed: validation noise is the same in every run


@torch.no_grad()
def validation_stats(denoiser, unwrapped, val: list[Example], recipe: Recipe, ids: TokenIds, device) -> LossStats:
    """Validation loss and accuracy under deterministic noise: level and seed fixed per example index.
    `denoiser` as prepared, `unwrapped` the Denoiser (its causal parent is the distillation target)."""
    denoiser.eval()
    levels = validation_levels(len(val), recipe.noise.t_min)
    pool = replacement_pool(val, ids.special)
    stats = LossStats()
    for start in range(0, len(val), recipe.batch_size):
        idx = list(range(start, min(start + recipe.batch_size, len(val))))
        batch = make_batch([val[i] for i in idx], recipe, ids.pad, ids.eos)
        seeds = [seed_for(VALIDATION_SEED, i) for i in idx]
        _, part = batch_loss(denoiser, unwrapped, batch, recipe, ids, seeds, levels[idx], pool, device)
        stats.add(part)
    denoiser.train()
    return stats


def validate(run: Run, state: TrainState, step: int) -> None:
    """Validation at `step`, recorded; a new best validation loss is saved to best/ (main process)."""
    if not run.val_set:
        return
    stats = validation_stats(run.denoiser, run.unwrapped, run.val_set, run.recipe, run.ids, run.accelerator.device)
    summary = stats.summary("val_")
    run.metrics.record({"step": step, **summary})
    log.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    if summary["val_loss"] < state.best_val:
        state.best_val = summary["val_loss"]
        if run.main:
            save_best(run, step, state.best_val)


def save_best(run: Run, step: int, val_loss: float) -> None:
    """best/: the weights and a lad.json that names their step and validation loss."""
    with staged(run.out / "best") as tmp:
        save_weights(run.unwrapped.model, tmp)
        dataclasses.replace(run.info, step=step, extra={"val_loss": val_loss}).save(tmp)
