"""Train a LAD denoiser: `accelerate launch lad/finetune.py RECIPE.yaml [key=value ...]` (or `lad-finetune`).

Read top to bottom, this is the whole recipe (torchtune style, no hidden Trainer):

    recipe → [parent answers distilled sources, cached] → base model + tokenizer → mask token → data
           → bidirectional + LoRA → Denoiser
           → for each step: batch → corruption → logits at supervised positions → weighted loss
             (+ KL toward the causal parent) → update (non-finite loss: skip or stop)
           → validation, checkpoints, best weights → run directory with lad.json

Determinism: the data order is a pure function of (seed, epoch); the noise levels of a step are drawn from
(seed, step), each row's corruption from (seed, step, row) and replacement tokens from the whole step's
answers, so the noise a row gets does not depend on how rows are split into micro-batches or processes.
LoRA dropout is seeded from (seed, step, micro-step, rank). A resumed run replays exactly what it missed.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (`accelerate launch lad/finetune.py`): Python put lad/ first on sys.path, where a
    # module could shadow a library. Drop it and import the package from the folder above.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from lad.data import DataError, Example, batch_indices, collate, encode_rows, find_token, load_rows
from lad.data.distilled import distill_sources
from lad.distill import DistillError
from lad.loss import LossStats, distill_positions, kl_to_parent, position_stats, weighted_cross_entropy
from lad.modeling.adapters import LoraTargetError, attach_lora, check_lora_targets, count_parameters, prepare_embeddings
from lad.modeling.anneal import anneal_progress, annealed_allowed
from lad.modeling.bidirectional import UnsupportedArchitectureError
from lad.modeling.denoiser import Denoiser, position_ids_from_mask
from lad.modeling.load import load_base
from lad.modeling.locate import ModelNotFoundError
from lad.modeling.mask_token import MaskToken, MaskTokenError, check_not_in_data, resolve_mask_token
from lad.modeling.prompt_causal import answer_columns, answer_start_from, prompt_causal_allowed
from lad.modeling.windows import decoder_mask
from lad.noise import corrupt, sample_levels, validation_levels
from lad.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from lad.resume import (NothingToDo, ResumePlan, apply_changes, check_data, check_progress, data_digest,
                        history_lines, plan_resume)
from lad.run import (LadInfo, RunDirError, latest_checkpoint, load_checkpoint_state, prepare_output_dir,
                     save_checkpoint, save_weights, staged)
from lad.safety import PathError, run_header
from lad.stopping import Interrupted, stop_signals

log = logging.getLogger("lad.finetune")

VALIDATION_SEED = 20250101  # fixed, not the run's seed: validation noise is the same in every run
USER_ERRORS = (RecipeError, DataError, ModelNotFoundError, UnsupportedArchitectureError, MaskTokenError,
               RunDirError, DistillError, ImportError, PathError, LoraTargetError)


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so (seed, step, row) never collide like seed+step would."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ---------------------------------------------------------------- data


def encode_sources(sources, recipe: Recipe, tokenizer) -> list[Example]:
    examples: list[Example] = []
    for source in sources:
        text_field = source.fields.get("text", "text")
        try:
            rows = load_rows(source.path, split=source.split, text_field=text_field, max_rows=source.max_rows,
                             separator=source.separator)
            encoded, stats = encode_rows(rows, tokenizer, fmt=source.format, fields=source.fields or None,
                                         max_length=recipe.data.max_length, truncation=recipe.data.truncation,
                                         chat_template=recipe.data.chat_template,
                                         system_prompt=recipe.data.system_prompt, source_name=source.path)
        except DataError:
            raise
        except ValueError as err:  # bad fields / template / limits: name the source, no traceback
            raise DataError(f"{source.path}: {err}") from None
        log.info(stats.summary())
        if not encoded:
            raise DataError(f"{source.path}: no usable rows left (every row was dropped; see the counts above)")
        examples += encoded
    return examples


def load_data(recipe: Recipe, tokenizer, sources=None) -> tuple[list[Example], list[Example]]:
    """Encode train and validation examples; hold out `val_fraction` of train when no validation is given.
    sources: (train, validation) to read instead of the recipe's (distilled sources resolved to their files)."""
    train_sources, val_sources = sources or (recipe.data.train, recipe.data.validation)
    train = encode_sources(train_sources, recipe, tokenizer)
    if val_sources:
        val = encode_sources(val_sources, recipe, tokenizer)
    elif recipe.data.val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
        n_val = min(max(1, int(len(train) * recipe.data.val_fraction)), recipe.data.val_max_examples)
        held = set(order[:n_val])
        val = [train[i] for i in sorted(held)]
        train = [e for i, e in enumerate(train) if i not in held]
    else:
        val = []
    return train, val[: recipe.data.val_max_examples]


def prompt_style(recipe: Recipe, tokenizer) -> bool | str:
    """How inference renders a prompt, recorded in lad.json: "raw" when every training source is plain text (the
    model learnt to continue text, so "Once upon a time" is continued as it is), else whether the chat template
    was used."""
    if all(source.format == "text" for source in recipe.data.train):
        return "raw"
    return bool(getattr(tokenizer, "chat_template", None)) and recipe.data.chat_template is not False


def replacement_pool(examples: list[Example], special_ids: set[int]) -> torch.Tensor:
    """Answer tokens of these examples minus special tokens: plausible wrong tokens for `structural` noise."""
    tokens = torch.tensor([t for e in examples for t in e.answer_ids if t not in special_ids], dtype=torch.long)
    return tokens if tokens.numel() else torch.tensor([t for e in examples for t in e.answer_ids], dtype=torch.long)


def make_batch(examples: list[Example], recipe: Recipe, pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    batch = collate(examples, pad_id, shift=recipe.shift)
    batch["real_answer"] = batch["answer_mask"].clone()  # without EOS padding: where the parent is a target
    if recipe.eos_padding:  # LLaDA: answers padded with EOS to the batch length, inside the loss
        pad = batch["attention_mask"] == 0
        batch["input_ids"][pad] = eos_id
        batch["attention_mask"][pad] = 1
        batch["answer_mask"] |= pad
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    batch["answer_start"] = answer_start_from(batch["answer_mask"])  # where prompt-causal attention stops
    return batch


# ---------------------------------------------------------------- model


def load_model(recipe: Recipe):
    """Base model + tokenizer, with the mask token chosen (and its embedding row added if needed)."""
    model, tokenizer = load_base(recipe.model, seed=recipe.seed)
    mask = resolve_mask_token(tokenizer, recipe.mask_token)
    prepare_embeddings(model, tokenizer, mask)
    if recipe.gradient_checkpointing and not recipe.model.quantization:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the new name (transformers >= 5.2x)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, mask


def add_trainable(model, recipe: Recipe, mask: MaskToken):
    if recipe.lora.enabled:
        return attach_lora(model, recipe.lora, mask, quantized=recipe.model.quantization is not None,
                           gradient_checkpointing=recipe.gradient_checkpointing)
    model.requires_grad_(True)
    return model


def build_optimizer(recipe: Recipe, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=recipe.optim.lr, betas=tuple(recipe.optim.betas), eps=recipe.optim.eps,
                  weight_decay=recipe.optim.weight_decay)
    if recipe.optim.name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name=adamw_8bit needs bitsandbytes: pip install 'lad[quant]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(recipe: Recipe, optimizer, total_steps: int):
    warmup = recipe.optim.warmup_steps
    kind = recipe.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- steps


def forward_loss(denoiser, batch, corruption, mask_id: int, device, *, distill_weight: float = 0.0, parent=None,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """Weighted CE summed over the rows of `batch`, computing the LM head only where the loss needs it.

    With distill_weight, `parent` (`Denoiser.parent_logits_at`) gives the causal parent's distribution on the
    clean batch at `distill_positions`, and weight·KL is added with each position's CE weight (the stats keep
    CE and KL apart). attention_mask: a 4-D mask (or `decoder_mask`'s per-layer-type masks), on `device`,
    to use instead of the batch's padding mask (annealing)."""
    positions = corruption.loss_mask.to(device)
    noisy = corruption.noisy_ids.to(device)
    position_ids = batch["position_ids"].to(device)
    attention = batch["attention_mask"].to(device) if attention_mask is None else attention_mask  # on `device`
    logits = denoiser(noisy, attention, positions=positions, position_ids=position_ids,
                      answer_start=batch["answer_start"].to(device))
    targets = batch["input_ids"].to(device)[positions]
    weights = corruption.weights.to(device)[positions]
    loss_sum = weighted_cross_entropy(logits, targets, weights)
    was_masked = (noisy == mask_id)[positions]
    stats = position_stats(logits, targets, was_masked, loss_sum.detach(), len(batch["input_ids"]))
    if not distill_weight:
        return loss_sum, stats
    where = distill_positions(noisy, batch["real_answer"].to(device), mask_id,
                              corruption.structural.to(device)) & positions
    if not where.any():
        return loss_sum, stats
    target = parent(batch["input_ids"].to(device), batch["attention_mask"].to(device), where, position_ids)
    pick = where[positions]  # rows of `logits` (row-major over positions) that are distillation positions
    kl_sum = kl_to_parent(logits[pick], target, weights[pick])
    stats.kl_sum, stats.kl_tokens = float(kl_sum.detach()), int(where.sum())
    return loss_sum + distill_weight * kl_sum, stats


@torch.no_grad()
def evaluate(denoiser, val: list[Example], recipe: Recipe, mask_id: int, pad_id: int, eos_id: int, device,
             special_ids: set[int] = frozenset(), parent=None) -> LossStats:
    """Validation loss and accuracy under deterministic noise: level and seed fixed per example index."""
    denoiser.eval()
    levels = validation_levels(len(val), recipe.noise.t_min)
    pool = replacement_pool(val, special_ids)
    stats = LossStats()
    for start in range(0, len(val), recipe.batch_size):
        idx = list(range(start, min(start + recipe.batch_size, len(val))))
        batch = make_batch([val[i] for i in idx], recipe, pad_id, eos_id)
        gens = [torch.Generator().manual_seed(seed_for(VALIDATION_SEED, i)) for i in idx]
        corruption = corrupt(batch["input_ids"], batch["answer_mask"], levels[idx], recipe.noise, mask_id, gens,
                             replace_pool=pool)
        _, part = forward_loss(denoiser, batch, corruption, mask_id, device, distill_weight=recipe.distill_weight,
                               parent=parent)
        stats.add(part)
    denoiser.train()
    return stats


def metric_lines(path: Path) -> list[str]:
    """The complete lines of a metrics.jsonl; a last line cut short by a crash is dropped with a warning."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise RunDirError(f"{path}: line {i + 1} is not JSON (edited by hand?)") from None
            log.warning("%s: dropping its last line, cut short (%r)", path, line[:40])
            return lines[:-1]
    return lines


def gpu_memory(device) -> dict:
    """Peak CUDA memory since the start (allocated by tensors, reserved by the caching allocator), in MiB, for
    the metrics line: what a user sizes the next GPU by. Nothing on other devices."""
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20),
            "gpu_peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20)}


def signalled(stop, accelerator) -> bool:
    """Whether any process got SIGINT/SIGTERM this step (all processes then stop after the same step)."""
    flag = stop.signum is not None
    if accelerator.num_processes > 1:
        flag = bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())
    return flag


def gather_stats(accelerator, stats: LossStats) -> LossStats:
    """A step's statistics summed over processes (each saw only its own rows), the same on every process."""
    if accelerator.num_processes == 1:
        return stats
    names = [f.name for f in dataclasses.fields(LossStats)]
    values = accelerator.reduce(torch.tensor([float(getattr(stats, n)) for n in names], dtype=torch.float64,
                                             device=accelerator.device), "sum").tolist()
    return LossStats(**{n: type(getattr(stats, n))(v) for n, v in zip(names, values)})


class Schedule:
    """Which examples each optimizer step reads: a pure function of the step (for exact resume)."""

    GROUP = 50  # steps whose examples are sorted together when grouping by length

    def __init__(self, n_examples: int, recipe: Recipe, num_processes: int, lengths: list[int] | None = None):
        self.lengths = lengths if recipe.data.group_by_length else None
        self.per_step = recipe.batch_size * num_processes * recipe.grad_accum
        self.steps_per_epoch = n_examples // self.per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"the training data has {n_examples} examples, fewer than one optimizer step needs "
                            f"(batch_size {recipe.batch_size} × processes {num_processes} × grad_accum "
                            f"{recipe.grad_accum} = {self.per_step})")
        self.n, self.seed = n_examples, recipe.seed
        by_epochs = math.ceil(recipe.epochs * self.steps_per_epoch) if recipe.epochs is not None else None
        self.total_steps = min(s for s in (recipe.max_steps, by_epochs) if s is not None)
        self._epoch, self._order = -1, []

    def step_indices(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = batch_indices(self.n, self.per_step, seed=self.seed, epoch=epoch, drop_last=True)
            if self.lengths is not None:
                self._order = self.group_by_length(self._order, epoch)
            self._epoch = epoch
        return self._order[index]

    def group_by_length(self, steps: list[list[int]], epoch: int) -> list[list[int]]:
        """Sort each run of GROUP shuffled steps by example length and re-cut it, then shuffle the steps:
        batches of similar lengths waste little padding, and the order is still a function of (seed, epoch)."""
        out = []
        for start in range(0, len(steps), self.GROUP):
            pool = sorted((i for s in steps[start:start + self.GROUP] for i in s), key=lambda i: -self.lengths[i])
            out += [pool[k:k + self.per_step] for k in range(0, len(pool), self.per_step)]
        order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed_for(self.seed, epoch, 7)))
        return [out[i] for i in order.tolist()]


# ---------------------------------------------------------------- main


def recipe_text(recipe: Recipe, out: Path, plan: ResumePlan | None) -> str:
    """The run's recipe.yaml: a header that marks the folder as a run, the recipe, and each resume's changes."""
    return "\n".join([run_header(), dump_recipe(recipe, absolute_paths=True).rstrip("\n"),
                      *history_lines(out, plan)]) + "\n"


def _train(recipe: Recipe, allow_changes: tuple[str, ...] = (), stop=None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    resuming = recipe.resume_from is not None
    # every check that reads only files comes first: nothing loads or is written before they pass
    out = prepare_output_dir(recipe.output_dir, overwrite=recipe.overwrite, resuming=resuming, create=False)
    plan = plan_resume(recipe, out, yaml.safe_load(dump_recipe(recipe, absolute_paths=True)), allow_changes) \
        if resuming else ResumePlan(None)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(recipe.precision, recipe.precision),
                              log_with=recipe.report_to or None, project_dir=str(out))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    # self-distilled sources: the parent answers their prompts once (cached) before the training model loads
    with accelerator.main_process_first():
        sources = tuple(distill_sources(recipe, part, run=main) for part in (recipe.data.train, recipe.data.validation))
    set_seed(recipe.seed)  # LoRA's random init and an added mask row draw from the global RNG
    model, tokenizer, mask = load_model(recipe)
    train_set, val_set = load_data(recipe, tokenizer, sources)
    check_not_in_data(mask, find_token(train_set + val_set, mask.id))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    special_ids = set(tokenizer.all_special_ids) | {mask.id}
    schedule = Schedule(len(train_set), recipe, world, [len(e.prompt_ids) + len(e.answer_ids) for e in train_set])
    if recipe.lora.enabled:
        check_lora_targets(model, recipe.lora)
    check_progress(plan, schedule.total_steps, out)
    digest = data_digest(train_set, val_set)
    check_data(plan, digest)
    if main:  # only now, with model and data checked, is anything written
        prepare_output_dir(str(out), overwrite=recipe.overwrite, resuming=resuming)
    accelerator.wait_for_everyone()

    base_ref = dataclasses.asdict(recipe.model)
    for key in ("name_or_path", "tokenizer"):  # local paths stored absolute so the run loads from anywhere
        ref = base_ref[key]
        if ref and ref != "bytes" and not ref.startswith("pkg://") and os.path.exists(os.path.expanduser(ref)):
            base_ref[key] = os.path.abspath(os.path.expanduser(ref))
    if recipe.model.init == "scratch" and recipe.lora.enabled:  # the random base must travel with the run
        if main and not (plan.checkpoint is not None and (out / "base").is_dir()):  # a resume keeps its own
            with staged(out / "base") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
        base_ref.update(name_or_path="./base", init="pretrained", config={}, tokenizer=None)
    model = add_trainable(model, recipe, mask)
    denoiser = Denoiser(model, mask.id, recipe.shift, recipe.attention)
    trainable, total = count_parameters(denoiser)
    info = LadInfo(base_model=base_ref, mask_token=mask.token, mask_token_id=mask.id, mask_token_added=mask.added,
                   vocab_size=len(tokenizer), shift=recipe.shift, objective=recipe.noise.objective,
                   noise=dataclasses.asdict(recipe.noise), adapter="lora" if recipe.lora.enabled else "full",
                   chat_template=prompt_style(recipe, tokenizer),
                   max_length=recipe.data.max_length, eos_padding=recipe.eos_padding, attention=recipe.attention)
    optimizer = build_optimizer(recipe, denoiser)
    scheduler = build_scheduler(recipe, optimizer, schedule.total_steps)

    start_step, best_val, tokens_seen, skipped = 0, float("inf"), 0, 0
    if plan.checkpoint is not None:
        state = load_checkpoint_state(plan.checkpoint, model=denoiser.model, optimizer=optimizer, scheduler=scheduler)
        start_step, best_val, tokens_seen = state["step"], state.get("best_val", best_val), state.get("tokens", 0)
        skipped = state.get("skipped_steps", 0)
        apply_changes(plan, optimizer, scheduler, recipe)
        changed = "; ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in plan.changes.items())
        log.info("resumed from %s at step %d%s", plan.checkpoint, start_step, f" (changed: {changed})" if changed else "")
    if main:
        tokenizer.save_pretrained(out)
        (out / "recipe.yaml").write_text(recipe_text(recipe, out, plan), encoding="utf-8")
        log.info("model: %s | trainable %s of %s parameters (%.2f%%) | mask %r (id %d%s) | shift=%s",
                 recipe.model.name_or_path or "scratch", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 mask.token, mask.id, ", added" if mask.added else "", recipe.shift)
        log.info("data: %d train / %d validation examples; %d steps of %d examples (%d per epoch) on %d "
                 "process(es) (%s)", len(train_set), len(val_set), schedule.total_steps, schedule.per_step,
                 schedule.steps_per_epoch, world, accelerator.distributed_type.value)

    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    device = accelerator.device
    parent = accelerator.unwrap_model(denoiser).parent_logits_at  # no gradient: called outside DDP's forward
    weight_dtype = next(accelerator.unwrap_model(denoiser).parameters()).dtype
    if recipe.report_to:
        accelerator.init_trackers("lad", config={k: str(v) for k, v in recipe.to_dict().items()})
    if main and start_step and (out / "metrics.jsonl").is_file():  # drop lines logged after the checkpoint
        kept = [line for line in metric_lines(out / "metrics.jsonl") if json.loads(line)["step"] <= start_step]
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if main else None
    if main and plan.changes:  # a resume that changed settings says so where the curves are read
        metrics.write(json.dumps({"step": start_step, "resumed_from": str(plan.checkpoint), "changes": plan.changes})
                      + "\n")

    def record(entry: dict) -> None:
        if main:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()
        if recipe.report_to:
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def progress() -> dict:  # what a checkpoint's state.json carries besides the step, for an exact resume
        return {"best_val": best_val, "tokens": tokens_seen, "skipped_steps": skipped, "data_digest": digest}

    def validate(step: int) -> None:
        nonlocal best_val
        if not val_set:
            return
        stats = evaluate(denoiser, val_set, recipe, mask.id, pad_id, eos_id, device, special_ids, parent)
        summary = stats.summary("val_")
        record({"step": step, **summary})
        log.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        if summary["val_loss"] < best_val:
            best_val = summary["val_loss"]
            if main:
                with staged(out / "best") as tmp:
                    save_weights(accelerator.unwrap_model(denoiser).model, tmp)
                    dataclasses.replace(info, step=step, extra={"val_loss": best_val}).save(tmp)

    if recipe.eval_every and start_step == 0:
        validate(0)  # the starting point, so a run's curve shows what training bought
    denoiser.train()
    bar = tqdm(total=schedule.total_steps, initial=start_step, disable=not main, desc="lad", dynamic_ncols=True)
    rows_per_micro = recipe.batch_size
    t_last, tok_last = time.perf_counter(), 0
    if stop is not None:
        stop.deferred = True  # a signal now ends the loop after this step's checkpoint
    for step in range(start_step, schedule.total_steps):
        indices = schedule.step_indices(step)
        levels = sample_levels(len(indices), recipe.noise.t_min,
                               torch.Generator().manual_seed(seed_for(recipe.seed, step)), recipe.noise.stratified)
        pool = replacement_pool([train_set[i] for i in indices], special_ids)
        stats = LossStats()
        for micro in range(recipe.grad_accum):
            first = (micro * world + rank) * rows_per_micro
            rows = list(range(first, first + rows_per_micro))
            batch = make_batch([train_set[indices[j]] for j in rows], recipe, pad_id, eos_id)
            gens = [torch.Generator().manual_seed(seed_for(recipe.seed, step, j)) for j in rows]
            corruption = corrupt(batch["input_ids"], batch["answer_mask"], levels[rows], recipe.noise, mask.id, gens,
                                 replace_pool=pool)
            attention = None
            if step < recipe.anneal_steps:  # causal → bidirectional: a random share of later tokens visible
                allowed = annealed_allowed(batch["attention_mask"], anneal_progress(step, recipe.anneal_steps),
                                           [torch.Generator().manual_seed(seed_for(recipe.seed, step, j, 2))
                                            for j in rows])
                reads_both_ways = torch.ones_like(batch["attention_mask"], dtype=torch.bool)
                if recipe.attention == "prompt_causal":  # the prompt stays causal while the answer anneals
                    allowed &= prompt_causal_allowed(batch["attention_mask"], batch["answer_start"])
                    reads_both_ways = answer_columns(batch["answer_start"], allowed.shape[-1])
                attention = decoder_mask(allowed.to(device), reads_both_ways.to(device), denoiser.config,
                                         weight_dtype)
            torch.manual_seed(seed_for(recipe.seed, step, micro, rank, 1))  # LoRA dropout
            sync = nullcontext() if micro == recipe.grad_accum - 1 else accelerator.no_sync(denoiser)
            with sync, accelerator.autocast():
                loss_sum, part = forward_loss(denoiser, batch, corruption, mask.id, device,
                                              distill_weight=recipe.distill_weight, parent=parent,
                                              attention_mask=attention)
                # sum over the step's rows / rows per step; × world because DDP averages over processes
                accelerator.backward(loss_sum * world / schedule.per_step)
            part.input_tokens = int(batch["attention_mask"].sum())
            stats.add(part)
        done = step + 1
        stats = gather_stats(accelerator, stats)  # so a bad loss anywhere stops or skips on every process
        tokens_seen += stats.input_tokens
        loss = stats.loss_sum / max(stats.examples, 1)
        norm = accelerator.clip_grad_norm_(denoiser.parameters(), recipe.optim.grad_clip or float("inf"))
        if not (math.isfinite(stats.loss_sum + stats.kl_sum) and math.isfinite(float(norm))):
            skipped += 1
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {float(norm)}"
            if skipped > recipe.skip_bad_steps:
                bar.close()  # the message goes on a line of its own
                last = latest_checkpoint(out)
                raise FloatingPointError(
                    f"non-finite {what} at step {done}; stopped before updating the weights. The last good "
                    f"checkpoint is {last or 'none yet (save_every=0)'}: lower optim.lr, or set skip_bad_steps=N "
                    "to skip up to N such steps, then resume with resume_from=latest")
            log.warning("step %d: non-finite %s, step skipped (%d of skip_bad_steps=%d)", done, what, skipped,
                        recipe.skip_bad_steps)
            record({"step": done, "skipped": what, "skipped_steps": skipped})
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if done % recipe.log_every == 0 or done == schedule.total_steps:
            now = time.perf_counter()
            tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens_seen
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            record({"step": done, **stats.summary(), "lr": lr, "tokens": tokens_seen, "tokens_per_s": tps,
                    **gpu_memory(device)})
        if recipe.eval_every and done % recipe.eval_every == 0 and done < schedule.total_steps:
            validate(done)
        if recipe.save_every and done % recipe.save_every == 0 and done < schedule.total_steps:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, done, model=accelerator.unwrap_model(denoiser).model, optimizer=optimizer,
                                scheduler=scheduler, state=progress(), info=info, keep=recipe.keep_checkpoints)
        if stop is not None and signalled(stop, accelerator):
            bar.close()
            accelerator.wait_for_everyone()
            path = out / "checkpoints" / f"step-{done:06d}"
            if main and not path.is_dir():
                save_checkpoint(out, done, model=accelerator.unwrap_model(denoiser).model, optimizer=optimizer,
                                scheduler=scheduler, state=progress(), info=info, keep=recipe.keep_checkpoints)
            raise Interrupted(stop.signum or signal.SIGINT, done, path)
    if stop is not None:
        stop.deferred = False
    bar.close()
    if start_step < schedule.total_steps:  # (resumed from the final checkpoint: its validation is logged)
        validate(schedule.total_steps)
    accelerator.wait_for_everyone()
    if main:
        final = accelerator.unwrap_model(denoiser).model
        save_checkpoint(out, schedule.total_steps, model=final, optimizer=optimizer, scheduler=scheduler,
                        state=progress(), info=info, keep=recipe.keep_checkpoints)
        save_weights(final, out)
        dataclasses.replace(info, step=schedule.total_steps).save(out)
        metrics.close()
        log.info("saved %s (step %d)", out, schedule.total_steps)
        if recipe.report.prompts or (recipe.report.score_examples and val_set):
            report(accelerator.unwrap_model(denoiser), tokenizer, val_set, recipe, info, out)
    accelerator.end_training()
    return out


def report(denoiser, tokenizer, val_set: list[Example], recipe: Recipe, info: LadInfo, out: Path) -> None:
    """A few answers next to the AR parent's and a small score for both (recipe `report:`), printed and kept
    in the run directory as report.json. A full fine-tune (the from-scratch recipes) has no adapter to switch
    off, so no parent: its answers come alone."""
    from lad.report import make_report

    spec = recipe.report
    denoiser.eval()
    with torch.no_grad():
        result = make_report(denoiser, tokenizer, spec.prompts, val_set[:spec.score_examples], strategy=spec.strategy,
                             iters=spec.iters, max_new_tokens=spec.max_new_tokens, chat_template=info.chat_template,
                             parent=info.adapter == "lora" and not info.merged,
                             block_length=spec.block_length,
                             seed=recipe.seed)
    result.save(out)
    print(result.text(), flush=True)


def train(recipe: Recipe, *, allow_changes: tuple[str, ...] = (), stop=None) -> Path:
    """Run one training job; Accelerate's process-wide state is reset afterwards so a Python session (a
    notebook, the tests) can train again with other settings. allow_changes: TUNABLE keys (lad/resume.py)
    a resume may change; stop: a `stopping.StopRequest` that ends the loop cleanly on SIGINT/SIGTERM."""
    from accelerate.state import AcceleratorState

    try:
        return _train(recipe, tuple(allow_changes), stop)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lad-finetune", description="Train a LAD diffusion denoiser with LoRA from a YAML recipe.",
        epilog="Any recipe key can be overridden as key=value (dotted for nested keys), e.g. "
               "max_steps=20 output_dir=runs/t noise.objective=structural lora.r=8")
    parser.add_argument("recipe", help="recipe YAML file (see recipes/ and docs/recipe.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--overwrite", action="store_true", help="replace an output_dir that already holds files")
    parser.add_argument("--resume", action="store_true", help="same as resume_from=latest")
    parser.add_argument("--print-recipe", action="store_true", help="print the validated recipe and exit")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="on resume, apply a changed optimisation setting (optim.lr, optim.warmup_steps, "
                             "optim.scheduler, optim.weight_decay, optim.grad_clip, batch_size, grad_accum); "
                             "repeatable")
    return parser.parse_intermixed_args(argv)


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same arguments, resume_from=latest, no overwrite."""
    import shlex

    kept = [a for a in argv if a not in ("--overwrite", "--resume")
            and not a.startswith(("overwrite=", "resume_from="))]
    program = "lad-finetune" if not sys.argv[0].endswith("finetune.py") else f"accelerate launch {sys.argv[0]}"
    return f"{program} {shlex.join(kept)} resume_from=latest"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else []) + \
            (["resume_from=latest"] if args.resume else [])
        recipe = load_recipe(args.recipe, overrides)
        if args.print_recipe:
            print(dump_recipe(recipe), end="")
            return 0
        from lad.resume import TUNABLE

        for key in args.allow_change:
            if key not in TUNABLE:
                raise RecipeError(f"--allow-change {key}: not a setting a resume may change (one of "
                                  f"{', '.join(TUNABLE)})")
        with stop_signals() as stop:
            train(recipe, allow_changes=args.allow_change, stop=stop)
    except USER_ERRORS as err:
        print(f"lad-finetune: error: {err}", file=sys.stderr)
        return 2
    except NothingToDo as done:
        print(f"lad-finetune: {done}", file=sys.stderr)
        return 0
    except Interrupted as stop:
        if stop.step is None:
            print(f"\nlad-finetune: interrupted ({stop}) before training started; nothing to resume", file=sys.stderr)
        else:
            print(f"\nlad-finetune: interrupted ({stop}) after step {stop.step}, saved as {stop.checkpoint}; "
                  f"continue with: {resume_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 128 + stop.signum
    except OSError as err:  # disk full, read-only, permission denied while writing
        where = f"{err.filename}: " if err.filename else ""
        print(f"lad-finetune: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"lad-finetune: error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
