"""Block K/V cache (Fast-dLLM's "dual cache") for samplers that decode the answer in blocks.

While one block of answer slots is decoded, every other column of the canvas (the prompt, the finished blocks
before it, the masked blocks after it) changes little. `refresh` runs the canvas once at the start of a block
(against the prompt's `PrefixCache`), returns that forward's logits and keeps the keys and values of every
column except the block's; each later iteration of the block runs only the block's columns against those
frozen keys and values (`window_logits`), so a forward costs the block's width instead of the answer's.

Exact where nothing frozen would have changed: right after a refresh, and for the prompt of a prompt-causal run.
Otherwise approximate: the frozen answer columns do not see the block's new tokens until the next refresh
(Fast-dLLM reports the loss to be negligible; `eval/bench_sampling.py --block-cache` measures it on a run).
Attention is a weighted sum over keys, so the frozen keys may sit in any order in the cache (RoPE was applied
with each key's own position); the 2-D padding mask lists them in that same order. With `shift=True` the
window also holds the column before the block, whose hidden state predicts the block's first slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BlockCache:
    """Keys and values of every canvas column outside `[start, end)`, frozen at the block's refresh."""

    kv: object  # transformers DynamicCache: the frozen columns, canvas order minus the window
    key_mask: Tensor  # [B, K]: their padding mask, in the same order
    start: int  # the window: canvas columns recomputed at every iteration
    end: int
    last_hidden: Tensor | None = None  # [B, H]: hidden state of column start-1 (prompt-causal + shift, first block)


def window_of(denoiser, prefix, slot_start: int, slot_end: int) -> tuple[int, int, bool]:
    """(start, end, from_prefix): the canvas columns to recompute for slots [slot_start, slot_end), and whether
    the first slot's prediction comes from the prompt cache's last hidden state instead (prompt-causal + shift)."""
    start = slot_start - int(denoiser.shift)
    k = prefix.length if prefix is not None else 0
    if start < k:
        if prefix is None or prefix.last_hidden is None or start != k - 1:
            raise ValueError(f"block starting at column {slot_start} is predicted from inside the cached prompt")
        return k, slot_end, True
    return start, slot_end, False


def _frozen(kv, start: int, end: int):
    """A new DynamicCache holding `kv`'s columns outside [start, end) (columns indexed from the canvas start)."""
    from .denoiser import rebuilt_cache

    return rebuilt_cache(kv, lambda t: torch.cat([t[:, :, :start], t[:, :, end:]], dim=2))


def refresh(denoiser, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, prefix, slot_start: int,
            slot_end: int) -> tuple[Tensor, BlockCache]:
    """Logits for `positions` from a forward over the canvas after the prompt cache `prefix` (exactly
    `denoiser(input_ids, attention_mask, positions=positions, cache=prefix)`), and the block cache for the
    block of canvas columns [slot_start, slot_end)."""
    from transformers import DynamicCache

    from .denoiser import cropped_back, position_ids_from_mask

    if prefix is None:
        raise ValueError("a block cache starts from the prompt's cache (Denoiser.prefix_cache)")
    k = prefix.length
    start, end, from_prefix = window_of(denoiser, prefix, slot_start, slot_end)
    position_ids = position_ids_from_mask(attention_mask)
    kv = prefix.kv if k else DynamicCache()  # full layers: windows are cut by the masks (Denoiser.prefix_cache)
    with cropped_back(kv, k):
        hidden = denoiser._decode(input_ids[:, k:], attention_mask, position_ids[:, k:], kv)
        frozen = _frozen(kv, start, end)
    key_mask = torch.cat([attention_mask[:, :start], attention_mask[:, end:]], dim=1)
    cache = BlockCache(frozen, key_mask, start, end, prefix.last_hidden if from_prefix else None)
    return denoiser.head_at(hidden, k, positions, prefix.last_hidden), cache


def window_logits(denoiser, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache: BlockCache) -> Tensor:
    """Logits [N, V] for `positions` (which must lie in the block) from a forward over the window's columns
    alone, against the frozen keys and values."""
    from .denoiser import cropped_back, position_ids_from_mask

    start, end = cache.start, cache.end
    mask = torch.cat([cache.key_mask, attention_mask[:, start:end]], dim=1)
    position_ids = position_ids_from_mask(attention_mask)[:, start:end]
    with cropped_back(cache.kv, cache.key_mask.shape[1]):  # back to the frozen columns alone
        hidden = denoiser._decode(input_ids[:, start:end], mask, position_ids, cache.kv)
    return denoiser.head_at(hidden, start, positions, cache.last_hidden)
