"""One optimizer step, the whole of it: `train_step` is what lad/finetune.py runs each step and what the
benchmarks time (eval/bench_train_vs_peft.py), so neither can drift from the other.

Determinism: a step's noise levels are drawn from (seed, step), each row's corruption from (seed, step, row) and
replacement tokens from the whole step's answers, so the noise a row gets does not depend on how rows are split
into micro-batches or processes. Annealing masks are drawn from (seed, step, row, 2), LoRA dropout from
(seed, step, micro-step, rank, 1).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch

from lad.data import Example
from lad.loss import (LossStats, distill_positions, kl_to_parent, per_row_mean_weights, position_stats,
                      prompt_positions, weighted_cross_entropy)
from lad.modeling.anneal import anneal_progress, annealed_allowed
from lad.noise import corrupt, sample_levels
from lad.recipe import Recipe

from .blocks import block_batch, block_forward_loss
from .data import TokenIds, make_batch, replacement_pool, seed_for


@dataclasses.dataclass
class StepOutcome:
    """What one step did: its statistics summed over processes, and why it was skipped (None: it updated)."""

    stats: LossStats
    skipped: str | None = None  # "loss nan", "gradient norm inf": the weights were left as they were

    @property
    def loss(self) -> float:
        return self.stats.loss_sum / max(self.stats.examples, 1)


def train_step(accelerator, denoiser, optimizer, scheduler, recipe: Recipe, examples: list[Example], step: int,
               ids: TokenIds) -> StepOutcome:
    """One optimizer step over `examples`, the step's rows on every process (`Schedule.step_indices`): this
    process takes its micro-batches of them, corrupts, runs forward and backward, then gradients are clipped
    and the optimizer steps unless the loss or gradient norm is non-finite anywhere; the LR schedule always
    advances. `denoiser` and `optimizer` as `accelerator.prepare` returned them."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    levels = sample_levels(len(examples), recipe.noise.t_min,
                           torch.Generator().manual_seed(seed_for(recipe.seed, step)), recipe.noise.stratified)
    pool = replacement_pool(examples, ids.special)
    unwrapped = accelerator.unwrap_model(denoiser)
    stats = LossStats()
    for micro in range(recipe.grad_accum):
        first = (micro * world + rank) * recipe.batch_size
        rows = list(range(first, first + recipe.batch_size))
        batch = make_batch([examples[j] for j in rows], recipe, ids.pad, ids.eos)
        seeds = [seed_for(recipe.seed, step, j) for j in rows]
        attention = anneal_attention(unwrapped, batch, recipe, step, rows, device)
        torch.manual_seed(seed_for(recipe.seed, step, micro, rank, 1))  # LoRA dropout
        sync = nullcontext() if micro == recipe.grad_accum - 1 else accelerator.no_sync(denoiser)
        with sync, accelerator.autocast():
            loss_sum, part = batch_loss(denoiser, unwrapped, batch, recipe, ids, seeds, levels[rows], pool, device,
                                        attention)
            # sum over the step's rows / rows per step; × world because DDP averages over processes
            accelerator.backward(loss_sum * world / len(examples))
        part.input_tokens = int(batch["attention_mask"].sum())
        stats.add(part)
    stats = gather_stats(accelerator, stats)  # so a bad loss anywhere stops or skips on every process
    norm = accelerator.clip_grad_norm_(denoiser.parameters(), recipe.optim.grad_clip or float("inf"))
    outcome = StepOutcome(stats, non_finite(stats, float(norm)))
    if outcome.skipped is None:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return outcome


def batch_loss(denoiser, unwrapped, batch, recipe: Recipe, ids: TokenIds, seeds: list[int], levels, pool, device,
               attention=None) -> tuple[torch.Tensor, LossStats]:
    """Corrupt `batch` (row i from `seeds[i]`, at `levels[i]`) and return its summed loss and statistics: every
    block of a block-causal run in one pass (lad/training/blocks.py), else the corrupted rows as they are.
    `denoiser` as prepared (DDP), `unwrapped` the Denoiser; `attention`: an annealing step's mask."""
    parent = unwrapped.parent_logits_at
    choices = parent_choices(unwrapped, batch, recipe.noise.replace_top_k, ids.special, device) \
        if recipe.noise.replace_from == "parent" and recipe.noise.objective != "mask" else None
    if unwrapped.block_causal:
        laid = block_batch(batch, recipe.noise, unwrapped.block_size, unwrapped.shift, ids.mask, seeds, pool,
                           choices)
        return block_forward_loss(denoiser, unwrapped, laid, batch, device, distill_weight=recipe.distill_weight,
                                  prompt_distill_weight=recipe.prompt_distill_weight, parent=parent)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    corruption = corrupt(batch["input_ids"], batch["answer_mask"], levels, recipe.noise, ids.mask, gens,
                         replace_pool=pool, replace_choices=choices)
    return forward_loss(denoiser, batch, corruption, ids.mask, device, distill_weight=recipe.distill_weight,
                        prompt_distill_weight=recipe.prompt_distill_weight, parent=parent, attention_mask=attention)


@torch.no_grad()
def parent_choices(unwrapped, batch: dict, k: int, special: set[int], device) -> torch.Tensor:
    """[B, L, k] (CPU): for each answer slot, the AR parent's k likeliest tokens there given the clean text before
    it, the right token and special tokens left out: the plausible mistakes `replace_from: parent` plants. Zero
    outside the answer."""
    answer = batch["answer_mask"].bool()
    logits = unwrapped.parent_logits_at(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        answer.to(device), batch["position_ids"].to(device)).float()
    logits.scatter_(-1, batch["input_ids"][answer].to(device)[:, None], float("-inf"))
    banned = [t for t in special if t < logits.shape[-1]]
    if banned:
        logits[:, banned] = float("-inf")
    choices = torch.zeros(*answer.shape, k, dtype=torch.long)
    choices[answer] = logits.topk(k, dim=-1).indices.cpu()
    return choices


def non_finite(stats: LossStats, norm: float) -> str | None:
    """What makes this step unsafe to apply ("loss nan", "gradient norm inf"), or None."""
    if math.isfinite(stats.loss_sum + stats.kl_sum) and math.isfinite(norm):
        return None
    loss = stats.loss_sum / max(stats.examples, 1)
    return f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"


def anneal_attention(denoiser, batch, recipe: Recipe, step: int, rows: list[int], device):
    """The decoder mask of an annealing step (causal → bidirectional, DiffuLLaMA: a random share of later tokens
    visible, drawn per row), or None once annealing is over. `denoiser`: the unwrapped Denoiser."""
    if step >= recipe.anneal_steps:
        return None
    allowed = annealed_allowed(batch["attention_mask"], anneal_progress(step, recipe.anneal_steps),
                               [torch.Generator().manual_seed(seed_for(recipe.seed, step, j, 2)) for j in rows])
    # the Denoiser combines the draw with its mode (a prompt-causal prompt stays causal) and cuts sliding windows
    return denoiser.attention_for(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["answer_start"].to(device), annealed=allowed.to(device))


def forward_loss(denoiser, batch, corruption, mask_id: int, device, *, distill_weight: float = 0.0,
                 prompt_distill_weight: float = 0.0, parent=None,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """Weighted CE summed over the rows of `batch`, computing the LM head only where the loss needs it.

    With distill_weight, `parent` (`Denoiser.parent_logits_at`) gives the causal parent's distribution on the
    clean batch at `distill_positions`, and weight·KL is added with each position's CE weight; with
    prompt_distill_weight, also weight·KL at `prompt_positions`, each row's mean (the stats keep CE and both KLs
    apart). attention_mask: a 4-D mask (or `decoder_mask`'s per-layer-type masks), on `device`, to use instead
    of the batch's padding mask (annealing)."""
    positions = corruption.loss_mask.to(device)
    prompt = (prompt_positions(batch["attention_mask"], batch["answer_mask"]).to(device) if prompt_distill_weight
              else torch.zeros_like(positions))
    heads = positions | prompt  # where the LM head runs
    noisy = corruption.noisy_ids.to(device)
    position_ids = batch["position_ids"].to(device)
    attention = batch["attention_mask"].to(device) if attention_mask is None else attention_mask  # on `device`
    computed = denoiser(noisy, attention, positions=heads, position_ids=position_ids,
                        answer_start=batch["answer_start"].to(device))
    logits = computed[positions[heads]] if prompt_distill_weight else computed  # the CE's rows
    targets = batch["input_ids"].to(device)[positions]
    weights = corruption.weights.to(device)[positions]
    loss_sum = weighted_cross_entropy(logits, targets, weights)
    was_masked = (noisy == mask_id)[positions]
    stats = position_stats(logits, targets, was_masked, loss_sum.detach(), len(batch["input_ids"]))
    where = torch.zeros_like(positions)
    if distill_weight:
        where = distill_positions(noisy, batch["real_answer"].to(device), mask_id,
                                  corruption.structural.to(device)) & positions
    asked = where | prompt
    if not asked.any():
        return loss_sum, stats
    target = parent(batch["input_ids"].to(device), batch["attention_mask"].to(device), asked, position_ids)
    if where.any():
        pick = where[positions]  # rows of `logits` (row-major over positions) that are distillation positions
        kl_sum = kl_to_parent(logits[pick], target[where[asked]], weights[pick])
        stats.kl_sum, stats.kl_tokens = float(kl_sum.detach()), int(where.sum())
        loss_sum = loss_sum + distill_weight * kl_sum
    if prompt.any():
        prompt_kl = kl_to_parent(computed[prompt[heads]], target[prompt[asked]], per_row_mean_weights(prompt)[prompt])
        stats.prompt_kl_sum, stats.prompt_kl_tokens = float(prompt_kl.detach()), int(prompt.sum())
        loss_sum = loss_sum + prompt_distill_weight * prompt_kl
    return loss_sum, stats


def gather_stats(accelerator, stats: LossStats) -> LossStats:
    """A step's statistics summed over processes (each saw only its own rows), the same on every process."""
    if accelerator.num_processes == 1:
        return stats
    names = [f.name for f in dataclasses.fields(LossStats)]
    values = accelerator.reduce(torch.tensor([float(getattr(stats, n)) for n in names], dtype=torch.float64,
                                             device=accelerator.device), "sum").tolist()
    return LossStats(**{n: type(getattr(stats, n))(v) for n, v in zip(names, values)})


def signalled(stop, accelerator) -> bool:
    """Whether any process got SIGINT/SIGTERM this step (all processes then stop after the same step)."""
    flag = stop.signum is not None
    if accelerator.num_processes > 1:
        flag = bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())
    return flag
