"""Prompt-causal attention: the prompt reads as the AR parent read it, the answer sees everything.

`attention: bidirectional` (the default) lets every token attend to every other real token. With
`attention: prompt_causal` a prompt token attends only to the prompt tokens at or before it (the parent's
causal rule) and never to the answer, while an answer (canvas) token attends to every real token, prompt and
answer, in both directions:

    allowed(q, k) = real(k) and (k <= q or q >= answer_start)

Why (docs/model.md): the prompt's hidden states are then those of the causal parent up to what LoRA changes, so
conversion does not have to re-learn how to read a question, and with the shift the first answer token is
predicted exactly where and how the parent predicts it. It is the attention of block diffusion (BD3-LM, Fast-dLLM
v2, SDAR) with one block: the prompt. Two more things follow: the prompt never depends on the canvas, so a prefix
K/V cache of the prompt is exact, not an approximation; and generation still denoises the whole answer in parallel.

`answer_start` is a LongTensor [B]: each row's first answer column (prompt columns, and any left padding, come
before it). A row with no prompt (plain-text training) has answer_start 0 and is fully bidirectional.
"""

from __future__ import annotations

import torch
from torch import Tensor

ATTENTION_MODES = ("bidirectional", "prompt_causal")


def answer_start_from(answer_mask: Tensor) -> Tensor:
    """[B] first column of each row's answer (True entries of `answer_mask` [B, L]); L for a row with none."""
    answer_mask = answer_mask.bool()
    width = answer_mask.shape[1]
    column = torch.arange(width, device=answer_mask.device).expand_as(answer_mask)
    return column.masked_fill(~answer_mask, width).min(-1).values


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


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive 4-D mask [B, 1, L, L] from a bool [B, L, L] (0 = may attend, dtype's min = may not), the form
    transformers uses as is. Fully masked rows (a padding query) get a uniform, finite softmax, never NaN."""
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

