"""Block-causal training in one pass (BD3-LM, Fast-dLLM v2): every answer block of an example is denoised against
the clean blocks before it, all blocks in one forward.

At inference (lad/sampling/) block k is denoised while blocks 0..k-1 are clean and cached; so training shows
block k its own noisy tokens and the *clean* earlier blocks. One row holds the prompt, the clean answer and one or
two noisy copies of the answer at the same position ids:

    [ prompt | clean answer | noisy copy 1 | (noisy copy 2) | padding ]

and `attention.layout_allowed` lets the prompt read causally, the clean answer read block-causally (as a finished
canvas does), and noisy block k of a copy read the prompt, the clean blocks before k and its own block only. The
loss is on the noisy copies. With `shift` the first token of a block is predicted from the clean copy's token
before it (at inference: the finished block's last token), the others from the noisy token before them.

Noise: every block draws its own level (stratified over the row's blocks) and is corrupted by `noise.corrupt` as
if it were a whole answer, so structural edits stay inside their block; weights are renormalised to the row's
answer length, so a row's loss is still its per-token mean. `noise.complementary` adds a second copy masking
exactly the tokens the first left visible (level 1 - t), so every answer token is supervised each step.
The KL toward the causal parent (`distill_weight`) is kept where it is a valid target: a masked token after which
every token of its block is masked (the denoiser then sees the prompt, the clean earlier blocks and some of its
block's earlier tokens: a subset of what the parent conditions on, `loss.distill_positions` per block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lad.loss import (LossStats, distill_positions, kl_to_parent, per_row_mean_weights, position_stats,
                      prompt_positions, weighted_cross_entropy)
from lad.modeling.attention import ANSWER, NOISY
from lad.noise import Corruption, NoiseConfig, corrupt

from .data import seed_for


@dataclass
class BlockBatch:
    """A batch laid out for one-pass block training, and its N supervised entries (ordered row, copy, offset)."""

    input_ids: Tensor  # [B, W]
    attention_mask: Tensor  # [B, W] padding
    position_ids: Tensor  # [B, W]: the copies repeat the answer's positions
    kind: Tensor  # [B, W]: attention.PROMPT, ANSWER or NOISY + copy
    block: Tensor  # [B, W]: answer block of answer and noisy columns
    sources: Tensor  # [N] flat index into [B·W]: the column whose hidden state predicts entry n
    targets: Tensor  # [N] the clean token
    weights: Tensor  # [N] loss weight
    was_masked: Tensor  # [N] bool: the input there was the mask token
    distill: Tensor  # [N] bool: the causal parent is a valid target there
    logical: Tensor  # [N] flat index into the original batch's [B·L]: the token's own column
    copy: Tensor  # [N] which noisy copy the entry belongs to


def block_spans(answer_mask: Tensor, block_size: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every answer block of the batch, in order."""
    spans = []
    for row, answer in enumerate(answer_mask.bool()):
        start, end = _answer_span(answer)
        spans += [(row, a, min(a + block_size, end)) for a in range(start, end, block_size)]
    return spans


def block_levels(n_blocks: int, t_min: float, generator: torch.Generator) -> Tensor:
    """One noise level per block of a row, stratified over its blocks (one per stratum, in random order)."""
    strata = torch.randperm(n_blocks, generator=generator).float()
    return t_min + (1 - t_min) * (strata + torch.rand(n_blocks, generator=generator)) / n_blocks


def corrupt_blocks(batch: dict, noise: NoiseConfig, block_size: int, mask_id: int, row_seeds: list[int],
                   pool: Tensor, choices: Tensor | None = None) -> tuple[list[Corruption], list[Tensor]]:
    """(the noisy copies, each a `Corruption` in the batch's columns; their distillation positions [B, L]). Each
    block is one row of a `corrupt` call, drawn from its row's seed and its index, so a row's noise does not depend
    on the batch it is in."""
    ids, answer = batch["input_ids"], batch["answer_mask"].bool()
    spans = block_spans(answer, block_size)
    rows = torch.tensor([r for r, _, _ in spans], dtype=torch.long)
    pseudo_answer = torch.zeros((len(spans), ids.shape[1]), dtype=torch.bool)
    levels, gens, index = [], [], {}
    for k, (row, start, end) in enumerate(spans):
        pseudo_answer[k, start:end] = True
        index[row] = index.get(row, -1) + 1
        gens.append(torch.Generator().manual_seed(seed_for(row_seeds[row], index[row])))
    for row in sorted(index):
        levels.append(block_levels(index[row] + 1, noise.t_min, torch.Generator().manual_seed(seed_for(row_seeds[row], -1))))
    levels = torch.cat(levels) if levels else torch.zeros(0)
    pseudo_ids = ids[rows]
    first = corrupt(pseudo_ids, pseudo_answer, levels, noise, mask_id, gens, replace_pool=pool,
                    replace_choices=None if choices is None else choices[rows])
    copies = [first] + ([complement(pseudo_ids, pseudo_answer, first, mask_id, noise.t_min)]
                        if noise.complementary else [])
    scale = block_share(pseudo_answer, answer[rows])
    merged = [merge(c, rows, pseudo_answer, scale, ids, mask_id) for c in copies]
    return [m for m, _ in merged], [d for _, d in merged]


def block_share(pseudo_answer: Tensor, row_answer: Tensor) -> Tensor:
    """[P] each block's length over its row's answer length: `corrupt` normalises a block's weights by the block,
    the loss wants the row's answer."""
    return pseudo_answer.sum(-1).float() / row_answer.sum(-1).clamp(min=1).float()


def complement(ids: Tensor, answer: Tensor, first: Corruption, mask_id: int, t_min: float) -> Corruption:
    """The copy that masks exactly the answer tokens `first` left visible, at level 1 - t (weights 1/(t'·n))."""
    masked = answer & (first.noisy_ids != mask_id)
    level = (1 - first.levels).clamp(min=t_min)
    weights = masked.float() / (level[:, None] * answer.sum(-1, keepdim=True).clamp(min=1))
    return Corruption(ids.masked_fill(masked, mask_id), masked, weights, level, first.structural)


def merge(copy: Corruption, rows: Tensor, pseudo_answer: Tensor, scale: Tensor, ids: Tensor,
          mask_id: int) -> tuple[Corruption, Tensor]:
    """The per-block rows of `copy` put back into their batch rows (and its distillation positions [B, L])."""
    noisy, loss_mask = ids.clone(), torch.zeros(ids.shape, dtype=torch.bool)
    weights, distill = torch.zeros(ids.shape), torch.zeros(ids.shape, dtype=torch.bool)
    where = distill_positions(copy.noisy_ids, pseudo_answer, mask_id, copy.structural)
    for k, row in enumerate(rows.tolist()):
        span = pseudo_answer[k]
        noisy[row, span] = copy.noisy_ids[k, span]
        loss_mask[row, span] = copy.loss_mask[k, span]
        weights[row, span] = copy.weights[k, span] * scale[k]
        distill[row, span] = where[k, span]
    structural = torch.zeros(ids.shape[0], dtype=torch.bool)
    return Corruption(noisy, loss_mask, weights, torch.zeros(ids.shape[0]), structural), distill


def layout(batch: dict, copies: list[Corruption], distill: list[Tensor], block_size: int, shift: bool,
           mask_id: int, multiple: int = 8) -> BlockBatch:
    """The one-pass rows: prompt and clean answer in their own columns, each noisy copy after them."""
    ids, answer = batch["input_ids"], batch["answer_mask"].bool()
    spans = [_answer_span(a) for a in answer]
    width = max(end + len(copies) * (end - start) for start, end in spans)
    width = -(-width // multiple) * multiple
    out = {name: torch.zeros((ids.shape[0], width), dtype=torch.long)
           for name in ("input_ids", "attention_mask", "position_ids", "kind", "block")}
    for row, (start, end) in enumerate(spans):
        blocks = torch.arange(end - start) // block_size
        out["input_ids"][row, :end] = ids[row, :end]
        out["attention_mask"][row, :end] = batch["attention_mask"][row, :end]
        out["position_ids"][row, :end] = batch["position_ids"][row, :end]
        out["kind"][row, start:end], out["block"][row, start:end] = ANSWER, blocks
        for c, copy in enumerate(copies):
            columns = slice(end + c * (end - start), end + (c + 1) * (end - start))
            out["input_ids"][row, columns] = copy.noisy_ids[row, start:end]
            out["attention_mask"][row, columns] = 1
            out["position_ids"][row, columns] = batch["position_ids"][row, start:end]
            out["kind"][row, columns], out["block"][row, columns] = NOISY + c, blocks
    entries = supervised(ids, spans, copies, distill, block_size, shift, width, mask_id)
    return BlockBatch(**out, **entries)


def _answer_span(answer: Tensor) -> tuple[int, int]:
    where = torch.nonzero(answer).flatten()
    return (int(where[0]), int(where[-1]) + 1) if len(where) else (int(answer.shape[0]), int(answer.shape[0]))


def supervised(ids: Tensor, spans, copies: list[Corruption], distill: list[Tensor], block_size: int, shift: bool,
               width: int, mask_id: int) -> dict[str, Tensor]:
    """The supervised entries of every row and copy, ordered (row, copy, offset): BlockBatch's [N] fields."""
    parts = {key: [] for key in ("sources", "targets", "weights", "was_masked", "distill", "logical", "copy")}
    length = ids.shape[1]
    for row, (start, end) in enumerate(spans):
        for c, (copy, where) in enumerate(zip(copies, distill)):
            offsets = torch.nonzero(copy.loss_mask[row, start:end]).flatten()
            column = end + c * (end - start) + offsets  # the entry's own column in its copy
            if shift:  # a block's first token is read from the clean token before it, the others from the copy
                column = torch.where(offsets % block_size == 0, start + offsets - 1, column - 1)
            logical = start + offsets
            parts["sources"].append(row * width + column)
            parts["targets"].append(ids[row, logical])
            parts["weights"].append(copy.weights[row, logical])
            parts["was_masked"].append(copy.noisy_ids[row, logical] == mask_id)
            parts["distill"].append(where[row, logical])
            parts["logical"].append(row * length + logical)
            parts["copy"].append(torch.full((len(offsets),), c))
    return {key: torch.cat(values) if values else torch.zeros(0, dtype=torch.long) for key, values in parts.items()}


def block_batch(batch: dict, noise: NoiseConfig, block_size: int, shift: bool, mask_id: int, row_seeds: list[int],
                pool: Tensor, choices: Tensor | None = None) -> BlockBatch:
    """Corrupt every block of `batch` (one or two copies) and lay it out for one forward; `choices`: each slot's
    replacement candidates ([B, L, k], `replace_from: parent`)."""
    copies, distill = corrupt_blocks(batch, noise, block_size, mask_id, row_seeds, pool, choices)
    return layout(batch, copies, distill, block_size, shift, mask_id)


def block_forward_loss(denoiser, unwrapped, laid: BlockBatch, batch: dict, device, *, distill_weight: float = 0.0,
                       prompt_distill_weight: float = 0.0, parent=None) -> tuple[Tensor, LossStats]:
    """Weighted CE (+ weight·KL toward the causal parent) summed over the rows, one forward for every block.
    `denoiser` as prepared (DDP), `unwrapped` the Denoiser (it builds the layout's mask). prompt_distill_weight:
    also weight·KL at `loss.prompt_positions`, each row's mean: the layout keeps the prompt in its own columns,
    read causally, so with the shift those columns condition on exactly what the parent does."""
    attention = unwrapped.layout_mask(laid.kind.to(device), laid.block.to(device), laid.attention_mask.to(device),
                                      laid.position_ids.to(device))
    prompt = prompt_positions(batch["attention_mask"], batch["answer_mask"]) if prompt_distill_weight \
        else torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    rows, tokens = prompt.nonzero(as_tuple=True)
    width, length = laid.input_ids.shape[1], batch["input_ids"].shape[1]
    sources = torch.cat([laid.sources, rows * width + tokens - 1])  # token i is read from column i - 1
    computed = denoiser(laid.input_ids.to(device), attention, position_ids=laid.position_ids.to(device),
                        sources=sources.to(device))
    n = len(laid.sources)
    logits = computed[:n]
    targets, weights = laid.targets.to(device), laid.weights.to(device)
    loss_sum = weighted_cross_entropy(logits, targets, weights)
    stats = position_stats(logits, targets, laid.was_masked.to(device), loss_sum.detach(), len(batch["input_ids"]))
    distill = laid.distill if distill_weight else torch.zeros_like(laid.distill)
    if not distill.any() and not len(rows):
        return loss_sum, stats
    asked = torch.cat([laid.logical[distill], rows * length + tokens])
    target = parent_targets(parent, batch, asked, device)
    kept = int(distill.sum())
    if kept:
        pick = distill.to(device)
        kl_sum = kl_to_parent(logits[pick], target[:kept], weights[pick])
        stats.kl_sum, stats.kl_tokens = float(kl_sum.detach()), kept
        loss_sum = loss_sum + distill_weight * kl_sum
    if len(rows):
        prompt_kl = kl_to_parent(computed[n:], target[kept:], per_row_mean_weights(prompt)[prompt].to(device))
        stats.prompt_kl_sum, stats.prompt_kl_tokens = float(prompt_kl.detach()), len(rows)
        loss_sum = loss_sum + prompt_distill_weight * prompt_kl
    return loss_sum, stats


def parent_targets(parent, batch: dict, logical: Tensor, device) -> Tensor:
    """The causal parent's logits [M, V] at the batch's flat columns `logical` (repeats allowed: two copies may
    distil the same token), each computed once (`Denoiser.parent_logits_at` on the clean batch)."""
    ids = batch["input_ids"]
    where = torch.zeros(ids.numel(), dtype=torch.bool)
    where[logical] = True
    rank = where.long().cumsum(0) - 1
    out = parent(ids.to(device), batch["attention_mask"].to(device), where.view(ids.shape).to(device),
                 batch["position_ids"].to(device))
    return out[rank[logical].to(device)]
