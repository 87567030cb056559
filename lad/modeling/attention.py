"""Attention modes, declared once here, and the masks they allow. The `Denoiser` builds every decoder mask from
them (`Denoiser.attention_for`), training anneals through them, and samplers and scorers ask them whether a
prompt cache is exact.

- `bidirectional`: every token attends to every other real token (transformers' own path, a 2-D padding mask).
- `prompt_causal`: the prompt reads as the AR parent read it, the answer sees everything. A prompt token attends
  only to the prompt tokens at or before it (the parent's causal rule) and never to the answer, while an answer
  (canvas) token attends to every real token, prompt and answer, in both directions:

      allowed(q, k) = real(k) and (k <= q or q >= answer_start)

Why prompt-causal (docs/model.md): the prompt's hidden states are then those of the causal parent up to what LoRA
changes, so conversion does not have to re-learn how to read a question, and with the shift the first answer token
is predicted exactly where and how the parent predicts it. It is the attention of block diffusion (BD3-LM,
Fast-dLLM v2, SDAR) with one block: the prompt. The prompt never depends on the canvas, so a prefix K/V cache of
the prompt is exact, not an approximation (`prefix_cache_exact`).

`answer_start` is a LongTensor [B]: each row's first answer column (prompt columns, and any left padding, come
before it); `answer_start_from` (training rows, from their answer mask) and `answer_start_at` (canvases and scoring
batches, whose answers all start at one column) are the only two places it is computed. A row with no prompt
(plain-text training) has answer_start 0 and is fully bidirectional.

- `block_causal` (block diffusion: BD3-LM, Fast-dLLM v2, SDAR): the prompt reads causally as above; the answer is
  cut into blocks of `block_size` tokens from its first column, and an answer token attends to the prompt, to every
  earlier block and to every token of its own block, never to a later block:

      allowed(q, k) = real(k) and (k <= q if q < answer_start else block(k) <= block(q))

  with block(c) = (c - answer_start) // block_size (negative in the prompt). Across blocks the model is
  autoregressive, so a finished block's keys and values never change: the samplers cache them exactly, block by
  block (lad/modeling/cache.py: `GrowingCache`). `block_size: 1` is exactly causal.

Every mask is built by `layout_allowed` from two per-column facts, a kind and a block: the prompt (kind 0), an answer
read block-causally (kind 1) and, in training only, noisy copies of the answer (kinds 2, 3: lad/training/blocks.py),
each noisy block attending to the prompt, the clean blocks before it and its own block. That one-pass layout is the
training side of `block_causal`; the canvas of a sampler or scorer is its special case with no noisy copy.

Annealing (lad/modeling/anneal.py) draws which later keys each query may see; `allowed` combines that draw with
the mode, so the prompt of a prompt-causal run stays causal while its answer anneals.
"""

from __future__ import annotations

import torch
from torch import Tensor

BIDIRECTIONAL, PROMPT_CAUSAL, BLOCK_CAUSAL = "bidirectional", "prompt_causal", "block_causal"
MODES = (BIDIRECTIONAL, PROMPT_CAUSAL, BLOCK_CAUSAL)
_PREFIX_EXACT = {PROMPT_CAUSAL, BLOCK_CAUSAL}  # modes whose prompt never attends to the answer
PROMPT, ANSWER, NOISY = 0, 1, 2  # column kinds of `layout_allowed`; noisy copy c has kind NOISY + c


def check_mode(mode: str, block_size: int | None = None) -> str:
    """`mode`, checked with its block size (required by block_causal and only by it)."""
    if mode not in MODES:
        raise ValueError(f"attention must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == BLOCK_CAUSAL and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ValueError(f"block_size: attention block_causal needs an integer block_size >= 1, got {block_size!r}")
    return mode


def prefix_cache_exact(mode: str) -> bool:
    """Whether the prompt's keys and values computed alone equal those of a full forward (the prompt never sees
    the answer): then samplers and scorers cache it by default (docs/sampling.md, docs/scoring.md)."""
    return mode in _PREFIX_EXACT


def answer_start_from(answer_mask: Tensor) -> Tensor:
    """[B] first column of each row's answer (True entries of `answer_mask` [B, L]); L for a row with none."""
    answer_mask = answer_mask.bool()
    width = answer_mask.shape[1]
    column = torch.arange(width, device=answer_mask.device).expand_as(answer_mask)
    return column.masked_fill(~answer_mask, width).min(-1).values


def answer_start_at(column: int, rows: int, device=None) -> Tensor:
    """[B] answer_start of a left-padded batch whose answers all begin at `column` (canvases, scoring batches)."""
    return torch.full((rows,), column, dtype=torch.long, device=device)


def answer_columns(answer_start: Tensor, length: int) -> Tensor:
    """Bool [B, L]: the columns at or after each row's answer_start (the queries that read both ways)."""
    index = torch.arange(length, device=answer_start.device)
    return index[None, :] >= answer_start[:, None]


def prompt_causal_allowed(attention_mask: Tensor, answer_start: Tensor) -> Tensor:
    """Bool [B, L, L]: may query q attend to key k (padding keys never)."""
    length = attention_mask.shape[1]
    device = attention_mask.device
    index = torch.arange(length, device=device)
    earlier = index[None, :] <= index[:, None]  # [q, k]: k <= q
    in_answer = answer_columns(answer_start.to(device), length)[:, :, None]  # [B, q, 1]
    return (earlier[None] | in_answer) & attention_mask.bool()[:, None, :]


def layout_allowed(kind: Tensor, block: Tensor, attention_mask: Tensor, clean_causal: bool = False) -> Tensor:
    """Bool [B, L, L] may query q attend to key k, from each column's kind and block ([B, L] each; kinds PROMPT,
    ANSWER, NOISY + c; block: the answer block of an answer or noisy column). Padding keys never:

    - a prompt key: to a prompt query at or after it (the parent's causal rule), to every answer or noisy query;
    - an answer key of block j: to answer queries of block >= j (block-causal), to noisy queries of block > j;
    - a noisy key of copy c, block j: to the queries of copy c and block j only (a block denoises against the
      clean blocks before it, never against another copy or another noisy block).

    `clean_causal` (a mask-gated LoRA, lad/modeling/gate.py): answer keys reach answer queries at or after them
    only, so the clean answer reads causally and computes exactly the parent."""
    index = torch.arange(kind.shape[1], device=kind.device)
    q_kind, k_kind = kind[:, :, None], kind[:, None, :]
    q_block, k_block = block[:, :, None], block[:, None, :]
    prompt_key = (k_kind == PROMPT) & ((q_kind != PROMPT) | (index[None, None, :] <= index[None, :, None]))
    clean_rule = (index[None, None, :] <= index[None, :, None]) if clean_causal else (k_block <= q_block)
    answer_key = (k_kind == ANSWER) & (((q_kind == ANSWER) & clean_rule)
                                       | ((q_kind >= NOISY) & (k_block < q_block)))
    noisy_key = (k_kind >= NOISY) & (k_kind == q_kind) & (k_block == q_block)
    return (prompt_key | answer_key | noisy_key) & attention_mask.bool()[:, None, :]


def canvas_layout(answer_start: Tensor, length: int, block_size: int) -> tuple[Tensor, Tensor]:
    """(kind, block) [B, L] of a canvas or training row: prompt before answer_start, answer blocks of
    `block_size` from it."""
    offset = torch.arange(length, device=answer_start.device)[None, :] - answer_start[:, None]
    kind = (offset >= 0).long() * ANSWER
    return kind, torch.div(offset, block_size, rounding_mode="floor")


def block_causal_allowed(attention_mask: Tensor, answer_start: Tensor, block_size: int) -> Tensor:
    """Bool [B, L, L] of block-causal attention (prompt causal, answer block-causal from answer_start)."""
    return layout_allowed(*canvas_layout(answer_start, attention_mask.shape[1], block_size), attention_mask)


def allowed(mode: str, attention_mask: Tensor, answer_start: Tensor | None,
            annealed: Tensor | None = None, block_size: int | None = None) -> tuple[Tensor, Tensor] | None:
    """(bool [B, L, L] may q attend to k, bool [B, L] queries that read both ways) for `mode`, or None when the
    decoder's own 2-D padding path already is the mode (bidirectional, not annealing). `annealed`: a bool
    [B, L, L] draw of `anneal.annealed_allowed`, combined with the mode. `block_size`: block_causal's."""
    if mode == BIDIRECTIONAL and annealed is None:
        return None
    length = attention_mask.shape[1]
    if mode in (PROMPT_CAUSAL, BLOCK_CAUSAL):
        if answer_start is None:
            raise ValueError(f"this model reads its prompt causally (attention: {mode}): "
                             "pass answer_start, the first answer column of each row")
        answer_start = answer_start.to(attention_mask.device)
        mask = prompt_causal_allowed(attention_mask, answer_start) if mode == PROMPT_CAUSAL else \
            block_causal_allowed(attention_mask, answer_start, block_size)
        both_ways = answer_columns(answer_start, length)
        return (mask if annealed is None else mask & annealed.to(mask.device)), both_ways
    both_ways = torch.ones(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    return annealed.to(attention_mask.device), both_ways
