"""Corruption schedules for training the bidirectional denoiser.

Two schedules, both applied only inside each row's answer span:

- mask: absorbing noise as in LLaDA/MDLM. Each answer token becomes [MASK] with
  prob t; the loss is on masked tokens, weighted 1/(t * n_answer).
- structural: LAD's refinement noise. Span shifts, duplications, adjacent swaps,
  random replacements, then masking. The loss is on every answer token, weighted
  1/n_answer, so the model learns to keep right tokens and repair wrong ones.

Whatever the objective, `suffix_share` of the rows instead mask every answer token
from a cut on (m = round(t * n) tokens, at least one), weighted 1/m: the left-to-right
factorisation the AR parent knows, kept alive under bidirectional attention.

Edits are drawn as events: for each op, every eligible position starts an event
independently with prob rate * t (one draw per position, up front), and the events
are then applied left to right to the sequence as edited so far.

Rows are corrupted one at a time on the CPU: the edits are many tiny scalar ops,
which are cheap there and would force a sync per op on a GPU. With a single
generator, rows draw from it in order; with a list, row i draws only from
generator i, so its noise does not depend on the rest of the batch.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

OBJECTIVES = ("mask", "structural", "mixed")
REPLACE_FROM = ("pool", "parent")


@dataclass
class NoiseConfig:
    objective: Literal["mask", "structural", "mixed"] = "mask"  # "mask" | "structural" | "mixed"
    t_min: float = 1e-3  # levels t ~ U(t_min, 1)
    stratified: bool = True  # one level per stratum across the batch (lower variance, MDLM)
    mixed_structural_prob: float = 0.5  # mixed: prob that an example is structural
    full_mask_share: float = 0.1  # structural: share of examples whose whole answer is masked
    # structural: share of examples left without masks, edits only: a finished draft, what --polish reads
    draft_share: float = 0.0
    mask_rate: float = 1.0  # structural: answer token masked w.p. mask_rate * t
    replace_rate: float = 0.1  # structural: token replaced by a random pool token w.p. rate * t
    # structural: where replacements come from: "pool", any answer token of the step; "parent", one of the AR
    # parent's `replace_top_k` likeliest tokens for that slot other than the right one (a plausible mistake)
    replace_from: Literal["pool", "parent"] = "pool"
    replace_top_k: int = 8
    swap_rate: float = 0.1  # structural: adjacent swap starting at a position w.p. rate * t
    duplicate_rate: float = 0.05  # structural: token repeated at the next position w.p. rate * t
    span_shift_rate: float = 0.05  # structural: span starting at a position moves w.p. rate * t
    max_span: int = 4  # span shift: span length 1..max_span
    max_shift: int = 2  # span shift: displacement 1..max_shift, either direction
    suffix_share: float = 0.0  # share of rows masked from a cut to the answer's end (left-to-right)
    # block_causal only: a second noisy copy masks exactly what the first left visible (Fast-dLLM v2), so every
    # answer token is supervised in every step (lad/training/blocks.py)
    complementary: bool = False
    # structural: loss weight of a slot shown a wrong token (an edit, not a mask) relative to one shown its right
    # token; > 1 makes the few repairs of a draft row count against the many copies (issue 31's lever)
    wrong_weight: float = 1.0

    def validate(self) -> None:
        """Fail early with the field name, rather than train on a silently odd schedule."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.replace_from not in REPLACE_FROM:
            raise ValueError(f"replace_from: must be one of {REPLACE_FROM}, got {self.replace_from!r}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min: must be in (0, 1), got {self.t_min!r}")
        for name in ("mixed_structural_prob", "full_mask_share", "draft_share", "suffix_share", "mask_rate",
                     "replace_rate", "swap_rate", "duplicate_rate", "span_shift_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
        if self.complementary and (self.objective != "mask" or self.suffix_share):
            raise ValueError("complementary: needs objective mask and suffix_share 0 (the complement of a "
                             "structural edit or of a suffix cut is not a sample of the same schedule)")
        if not (isinstance(self.wrong_weight, (int, float)) and 0 < self.wrong_weight < float("inf")):
            raise ValueError(f"wrong_weight: must be a number > 0, got {self.wrong_weight!r}")
        for name in ("max_span", "max_shift", "replace_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


@dataclass
class Corruption:
    noisy_ids: Tensor  # [B, L] long: input for the denoiser
    loss_mask: Tensor  # [B, L] bool: positions the loss is computed at (targets = clean ids)
    weights: Tensor  # [B, L] float: per-position loss weight (0 outside loss_mask)
    levels: Tensor  # [B] float: the noise level t used per example
    structural: Tensor  # [B] bool: which examples got the structural schedule
    suffix: Tensor | None = None  # [B] bool: which examples were masked from a cut on (suffix_share)


def sample_levels(batch_size: int, t_min: float, generator: torch.Generator,
                  stratified: bool = True) -> Tensor:
    """Levels in [t_min, 1]; stratified puts one level in each of B equal strata."""
    u = torch.rand(batch_size, generator=generator, device=generator.device)
    if stratified:
        perm = torch.randperm(batch_size, generator=generator, device=generator.device)
        u = (perm + u) / batch_size
    return t_min + (1.0 - t_min) * u


def validation_levels(n: int, t_min: float) -> Tensor:
    """Midpoints of n strata: fixed levels, so validation losses compare across runs."""
    return t_min + (1.0 - t_min) * (torch.arange(n, dtype=torch.float32) + 0.5) / n


def _rand(n: int, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen, device=gen.device).cpu()


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=gen, device=gen.device).item())


def _events(n: int, p: float, gen: torch.Generator) -> list[int]:
    """Positions 0..n-1 that start an event, each independently with prob p."""
    return torch.nonzero(_rand(n, gen) < p).flatten().tolist()


def _span_shift(x: Tensor, a: int, k: int, d: int) -> None:
    """Move x[a:a+k] by d (sign = direction) by rotating the window it sweeps; clipped to x."""
    n = len(x)
    k = min(k, n - a)
    if d > 0:
        d = min(d, n - a - k)
        lo, hi, roll = a, a + k + d, d  # displaced tokens move left into the vacated place
    else:
        d = min(-d, a)
        lo, hi, roll = a - d, a + k, -d  # displaced tokens move right
    if d > 0:
        x[lo:hi] = torch.roll(x[lo:hi].clone(), roll)


EDITS = ("span_shift", "duplicate", "swap", "replace", "mask")  # the order the structural schedule applies them


def apply_edit(x: Tensor, edit: str, p: float, mask_id: int, pool: Tensor, gen: torch.Generator,
               max_span: int = 4, max_shift: int = 2) -> None:
    """Apply one kind of edit in place to one answer span x, each eligible position drawing it with prob p: the
    structural schedule's step, and on its own the repair benchmark's corruption (eval/bench_refine.py)."""
    n = len(x)
    if edit == "span_shift":
        for a in _events(n, p, gen):
            k = _randint(1, max_span + 1, gen)
            d = _randint(1, max_shift + 1, gen) * (1 if _randint(0, 2, gen) else -1)
            _span_shift(x, a, k, d)
    elif edit == "duplicate":
        for j in _events(n - 1, p, gen):
            x[j + 1:] = x[j:-1].clone()
    elif edit == "swap":
        last = -2
        for j in _events(n - 1, p, gen):
            if j > last + 1:  # skip overlapping swaps: changes stay disjoint adjacent pairs
                x[[j, j + 1]] = x[[j + 1, j]]
                last = j
    elif edit == "replace":  # pool: 1-D, any of its tokens; 2-D [n, k], one of slot j's own k candidates
        for j in _events(n, p, gen):
            choices = pool if pool.dim() == 1 else pool[j]
            x[j] = choices[_randint(0, len(choices), gen)]
    elif edit == "mask":
        x[_rand(n, gen) < p] = mask_id
    else:
        raise ValueError(f"edit must be one of {', '.join(EDITS)}, got {edit!r}")


def _structural(x: Tensor, t: float, cfg: NoiseConfig, mask_id: int, pool: Tensor,
                gen: torch.Generator) -> None:
    """Apply the structural schedule in place to one answer span x."""
    if _rand(1, gen).item() < cfg.full_mask_share:
        x[:] = mask_id
        return
    # drawn only when asked for, so runs without draft rows keep their random streams
    draft = cfg.draft_share > 0 and _rand(1, gen).item() < cfg.draft_share
    rates = {"span_shift": cfg.span_shift_rate, "duplicate": cfg.duplicate_rate, "swap": cfg.swap_rate,
             "replace": cfg.replace_rate, "mask": 0.0 if draft else cfg.mask_rate}
    for edit in EDITS:
        apply_edit(x, edit, rates[edit] * t, mask_id, pool, gen, cfg.max_span, cfg.max_shift)


def corrupt(input_ids: Tensor, answer_mask: Tensor, levels: Tensor, cfg: NoiseConfig,
            mask_id: int, generator, replace_pool: Tensor | None = None,
            replace_choices: Tensor | None = None) -> Corruption:
    """Corrupt the answer span of each row at its level; prompt and padding stay as they are.

    generator: one torch.Generator for the batch, or a list with one per row.
    replace_pool: 1-D ids that replacements draw from (default: the batch's answer tokens),
    so wrong tokens look like text and are never special tokens.
    replace_choices: [B, L, k] ids, each slot's own candidates (`replace_from: parent`); replaces the pool.
    """
    cfg.validate()
    B, L = input_ids.shape
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * B
    if len(gens) != B:
        raise ValueError(f"generator: got {len(gens)} generators for a batch of {B}")
    if levels.shape != (B,) or bool((levels <= 0).any()) or bool((levels > 1).any()):
        raise ValueError(f"levels: need shape ({B},) with values in (0, 1], got {levels}")
    ids, answer, t_all = input_ids.cpu(), answer_mask.cpu().bool(), levels.cpu().float()
    pool = (ids[answer] if replace_pool is None else replace_pool.cpu()).long()
    if replace_pool is not None and (replace_pool.dim() != 1 or len(pool) == 0):
        raise ValueError(f"replace_pool: need a non-empty 1-D tensor, got shape {tuple(replace_pool.shape)}")

    noisy = ids.clone()
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    weights = torch.zeros(B, L, dtype=torch.float32)
    structural = torch.zeros(B, dtype=torch.bool)
    suffix = torch.zeros(B, dtype=torch.bool)
    for i in range(B):
        where = torch.nonzero(answer[i]).flatten()
        n = len(where)
        if n == 0:
            continue  # nothing to corrupt or supervise
        s, e = int(where[0]), int(where[-1]) + 1
        if e - s != n:
            raise ValueError(f"answer_mask: row {i} is not one contiguous span")
        t, gen = float(t_all[i]), gens[i]
        x = noisy[i, s:e]  # a view: edits land in noisy
        # drawn only when asked for, so runs without suffix rows keep their random streams
        if cfg.suffix_share > 0 and _rand(1, gen).item() < cfg.suffix_share:
            suffix[i] = True
            m = min(n, max(1, round(t * n)))
            x[n - m:] = mask_id
            loss_mask[i, s + n - m:e] = True
            weights[i, s + n - m:e] = 1.0 / m
            continue
        if cfg.objective == "mixed":
            structural[i] = bool(_rand(1, gen).item() < cfg.mixed_structural_prob)
        else:
            structural[i] = cfg.objective == "structural"
        if structural[i]:
            own = pool if replace_choices is None else replace_choices[i, s:e].cpu()
            _structural(x, t, cfg, mask_id, own, gen)
            loss_mask[i, s:e] = True
            wrong = (x != ids[i, s:e]) & (x != mask_id)
            weights[i, s:e] = torch.where(wrong, cfg.wrong_weight, 1.0) / n
        else:
            masked = _rand(n, gen) < t
            x[masked] = mask_id
            loss_mask[i, s:e] = masked
            weights[i, s:e] = masked.float() / (t * n)

    device = input_ids.device
    return Corruption(noisy.to(device), loss_mask.to(device), weights.to(device),
                      levels.float().to(device), structural.to(device), suffix.to(device))
