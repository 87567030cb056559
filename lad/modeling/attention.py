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

Annealing (lad/modeling/anneal.py) draws which later keys each query may see; `allowed` combines that draw with
the mode, so the prompt of a prompt-causal run stays causal while its answer anneals.
"""

from __future__ import annotations

import torch
from torch import Tensor

BIDIRECTIONAL, PROMPT_CAUSAL = "bidirectional", "prompt_causal"
MODES = (BIDIRECTIONAL, PROMPT_CAUSAL)
_PREFIX_EXACT = {PROMPT_CAUSAL}  # modes whose prompt never attends to the answer


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"attention must be one of {', '.join(MODES)}, got {mode!r}")
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


def allowed(mode: str, attention_mask: Tensor, answer_start: Tensor | None,
            annealed: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(bool [B, L, L] may q attend to k, bool [B, L] queries that read both ways) for `mode`, or None when the
    decoder's own 2-D padding path already is the mode (bidirectional, not annealing). `annealed`: a bool
    [B, L, L] draw of `anneal.annealed_allowed`, combined with the mode."""
    if mode == BIDIRECTIONAL and annealed is None:
        return None
    length = attention_mask.shape[1]
    if mode == PROMPT_CAUSAL:
        if answer_start is None:
            raise ValueError("this model reads its prompt causally (attention: prompt_causal): "
                             "pass answer_start, the first answer column of each row")
        answer_start = answer_start.to(attention_mask.device)
        mask = prompt_causal_allowed(attention_mask, answer_start)
        both_ways = answer_columns(answer_start, length)
        return (mask if annealed is None else mask & annealed.to(mask.device)), both_ways
    both_ways = torch.ones(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    return annealed.to(attention_mask.device), both_ways
