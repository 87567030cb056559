"""K/V caches: the prompt's (prefix), a decoded block's surroundings (block) and scoring contexts kept across batches.

A cache saves forwards by running some canvas columns once and keeping their keys and values (a transformers
`DynamicCache`); later forwards run only the other columns against them. Every layer keeps all its columns,
sliding-window layers too: the masks cut the windows (lad/modeling/windows.py), while transformers' sliding cache
layers would drop old columns and could not be cropped back after a cached forward. The caches call the
`Denoiser` through its public methods only (`prefix_cache`, `decode_into`, `head_at`); the `Denoiser` builds the
prefix cache and runs `forward(..., cache=...)` with the functions here.

Public API:

- `PrefixCache`: the keys and values of a canvas's first columns computed alone (built by
  `Denoiser.prefix_cache`); `select(rows)` copies some rows. `hidden_after_prefix` runs the columns after it
  (`Denoiser.forward(..., cache=...)` calls it). Exact for prompt-causal attention (docs/sampling.md).
- `KeptContexts`: scoring contexts' prefix caches kept while consecutive batches use them, so that a scoring run
  computes each context once; `split_rows` and `stacked` take a padded cache apart and put rows back together.
- `BlockCache`, `refresh_block`, `window_logits`: Fast-dLLM's "dual cache" for samplers that decode in blocks.
- K/V helpers: `position_ids_from_mask` (shared by cached and uncached forwards: positions must agree for a
  cache to be exact), `rebuilt_cache`, `crop_to`, `cropped_back`, `left_padded` (rows realigned to one width),
  `query_rows` and `cache_keyword` (the decoder's cache argument).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# -- K/V helpers


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over real tokens, so left padding does not move positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_keyword(decoder: nn.Module) -> str:
    """transformers 5.24 renamed the decoder's `past_key_values` argument to `cache` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def rebuilt_cache(kv, take):
    """A new transformers DynamicCache whose every layer holds `take(keys)` and `take(values)` of `kv`'s layer
    (tensors [B, heads, columns, head_dim]): rows or columns picked from a cache, which stays unchanged."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, layer in enumerate(kv.layers):
        out.update(take(layer.keys), take(layer.values), index)
    return out


def crop_to(kv, length: int) -> None:
    """Keep only the first `length` columns of the K/V cache `kv` (transformers' `crop` takes the count to drop)."""
    grown = kv.get_seq_length() - length
    if grown > 0:
        kv.crop(-grown)


def left_padded(kv, keep: Tensor, pads: Tensor, length: int):
    """A new DynamicCache of `length` columns whose row b is `pads[b]` zero columns (left padding, masked by the
    caller) then the first columns of `kv`'s row b, at most `keep[b]` of them: rows of a batch that advanced by
    different amounts realigned to one width (lad/sampling/speculative.py). Position ids come from the padding
    mask, so the keys and values of the kept columns stay exact."""
    if not bool(pads.any()) or not kv.get_seq_length():  # one width already: crop (rows keep `length` columns)
        crop_to(kv, length)
        return kv
    device = kv.layers[0].keys.device
    keep, pads = keep.to(device), pads.to(device)
    source = torch.arange(length, device=device)[None, :] - pads[:, None]  # [B, length]: the column it comes from
    real = (source >= 0) & (source < keep[:, None])

    def take(t: Tensor) -> Tensor:
        index = source.clamp(0, max(t.shape[2] - 1, 0))[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
        return t.gather(2, index) * real[:, None, :, None].to(t.dtype)
    return rebuilt_cache(kv, take)


@contextmanager
def cropped_back(kv, length: int):
    """Crop the K/V cache `kv` back to its first `length` columns when the block ends, however it ends: a cached
    forward appends the columns it computed, which the next forward must not see."""
    try:
        yield kv
    finally:
        crop_to(kv, length)


# -- the prefix cache


@dataclass
class PrefixCache:
    """Keys and values of a canvas's first `length` columns, computed with those columns alone.

    `ids` and `attention_mask` ([B, length]) are the cached columns; every cached forward checks that its canvas
    starts with them. `kv` is a transformers `DynamicCache` of exactly `length` positions (None when `length` is
    0: then there is nothing to reuse and the forward is the full one); cached forwards append to it and crop it
    back, so it never grows.
    """

    kv: object
    ids: Tensor
    attention_mask: Tensor
    last_hidden: Tensor | None = None  # [B, H] of the last cached column (prompt-causal + shift: it predicts slot 0)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def forwards(self) -> int:
        """Forwards spent building it (0 or 1): reported apart from the sampler's NFE."""
        return int(self.length > 0)

    def select(self, rows: Tensor) -> PrefixCache:
        """A new cache of rows `rows` (LongTensor; repeats allowed, e.g. one context for each of its answers);
        this one is unchanged."""
        rows = rows.to(self.ids.device)
        kv = None if self.kv is None else rebuilt_cache(self.kv, lambda t: t[rows.to(t.device)])
        last = self.last_hidden[rows.to(self.last_hidden.device)] if self.last_hidden is not None else None
        return PrefixCache(kv, self.ids[rows], self.attention_mask[rows], last)


def hidden_after_prefix(denoiser, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                        cache: PrefixCache) -> Tensor:
    """Hidden states of the columns after the cached prefix ([B, L - length, H]), attending to the prefix's
    cached keys and values and bidirectionally among themselves; the cache is cropped back afterwards."""
    k = cache.length
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.dim() != 2:
        raise ValueError("a cached forward takes a 2-D attention mask (padding) over the whole canvas")
    if input_ids.shape[1] <= k or not (torch.equal(input_ids[:, :k], cache.ids.to(input_ids.device))
                                      and torch.equal(attention_mask[:, :k].bool(),
                                                      cache.attention_mask.to(attention_mask.device).bool())):
        raise ValueError(f"the canvas does not start with the cached prefix ({k} columns)")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    with cropped_back(cache.kv, k):  # back to the prefix alone, however the forward ended
        return denoiser.decode_into(input_ids[:, k:], attention_mask, position_ids[:, k:], cache.kv)


# -- contexts kept across scoring batches
#
# A scorer with the prefix cache runs each batch's distinct contexts once (lad/scoring/batching.py, `context_batch`).
# Without keeping them, a request whose rows span several batches (score_elbo's M + 1 sequences per choice: 8 or 9
# batches of 16 at M = 128) runs its context again in every one. `KeptContexts` holds each context's keys and values
# on their own (one row, no padding) while batches still use it: a batch computes only the contexts the batch before
# did not have, together in one forward, and lays the rows it needs side by side, left-padded to the longest.
# Scorers order requests so that the rows of one context are consecutive (scoring's `context_order`), so a context
# that leaves a batch never comes back and is dropped; any other order stays exact, it only computes some again.
# Left padding is exact: padded columns are masked out of attention and position ids come from the mask, so a
# context's keys and values do not depend on which batch computed them (up to float rounding of batched matmuls).


def split_rows(cache: PrefixCache) -> list[PrefixCache]:
    """One single-row cache per row of a left-padded cache, its padding columns dropped."""
    pieces = []
    for row, real in enumerate(cache.attention_mask.bool()):
        pad = int((~real).sum())  # left padding: every padded column comes first
        ids, mask = cache.ids[row:row + 1, pad:], cache.attention_mask[row:row + 1, pad:]
        last = None if cache.last_hidden is None else cache.last_hidden[row:row + 1]
        empty = cache.kv is None or ids.shape[1] == 0
        kv = None if empty else rebuilt_cache(cache.kv, lambda t: t[row:row + 1, :, pad:])  # called at once
        pieces.append(PrefixCache(kv, ids, mask, last))
    return pieces


def stacked(pieces: list[PrefixCache], pad_id: int) -> PrefixCache:
    """Single-row caches as one cache, each left-padded to the longest (padding: `pad_id`, masked, zero K/V)."""
    width = max(piece.length for piece in pieces)
    rows = len(pieces)
    like = pieces[0].ids
    ids = torch.full((rows, width), int(pad_id), dtype=like.dtype, device=like.device)
    mask = torch.zeros((rows, width), dtype=pieces[0].attention_mask.dtype, device=like.device)
    for row, piece in enumerate(pieces):
        if piece.length:
            ids[row, width - piece.length:] = piece.ids[0]
            mask[row, width - piece.length:] = piece.attention_mask[0]
    last = None if pieces[0].last_hidden is None else torch.cat([p.last_hidden for p in pieces])
    filled = [piece for piece in pieces if piece.kv is not None]
    if not width or not filled:
        return PrefixCache(None, ids, mask, last)
    from transformers import DynamicCache

    def padded(layer: int, part: str):
        sample = getattr(filled[0].kv.layers[layer], part)
        out = sample.new_zeros((rows, sample.shape[1], width, sample.shape[3]))
        for row, piece in enumerate(pieces):
            if piece.kv is not None:
                out[row, :, width - piece.length:] = getattr(piece.kv.layers[layer], part)[0]
        return out

    kv = DynamicCache()
    for layer in range(len(filled[0].kv.layers)):
        kv.update(padded(layer, "keys"), padded(layer, "values"), layer)
    return PrefixCache(kv, ids, mask, last)


def _uncomputed(context, device) -> PrefixCache:
    """`context` as a single-row cache with no keys and values yet: `stacked` left-pads such rows into a batch."""
    ids = torch.tensor([list(context)], dtype=torch.long, device=device)
    return PrefixCache(None, ids, torch.ones_like(ids))


class KeptContexts:
    """Each distinct context's single-row cache, kept while consecutive batches use it."""

    def __init__(self):
        self.kept: dict[tuple[int, ...], PrefixCache] = {}

    def cache_for(self, denoiser, contexts: list[tuple[int, ...]], pad_id: int, device,
                  stats: dict | None = None) -> PrefixCache:
        """The cache of a batch whose row i has context `contexts[i]` (repeats share one computation), left-padded
        to the longest; the contexts the previous batch did not have run together in one forward.
        stats["prefix_rows"] += contexts computed."""
        distinct = list(dict.fromkeys(contexts))
        new = [c for c in distinct if c not in self.kept]
        if new:
            batch = stacked([_uncomputed(c, device) for c in new], pad_id)
            self.kept.update(zip(new, split_rows(denoiser.prefix_cache(batch.ids, batch.attention_mask))))
            if stats is not None:
                stats["prefix_rows"] = stats.get("prefix_rows", 0) + len(new)
        self.kept = {c: self.kept[c] for c in distinct}  # the others do not come back (context_order)
        return stacked([self.kept[c] for c in contexts], pad_id)


# -- the block cache (Fast-dLLM's "dual cache")
#
# While one block of answer slots is decoded, every other column of the canvas (the prompt, the finished blocks
# before it, the masked blocks after it) changes little. `refresh_block` runs the canvas once at the start of a
# block (against the prompt's `PrefixCache`), returns that forward's logits and keeps the keys and values of every
# column except the block's; each later iteration of the block runs only the block's columns against those frozen
# keys and values (`window_logits`), so a forward costs the block's width instead of the answer's.
# Exact where nothing frozen would have changed: right after a refresh, and for the prompt of a prompt-causal run.
# Otherwise approximate: the frozen answer columns do not see the block's new tokens until the next refresh
# (Fast-dLLM reports the loss to be negligible; `eval/bench_sampling.py --block-cache` measures it on a run).
# Attention is a weighted sum over keys, so the frozen keys may sit in any order in the cache (RoPE was applied with
# each key's own position); the 2-D padding mask lists them in that same order. With `shift=True` the window also
# holds the column before the block, whose hidden state predicts the block's first slot.


@dataclass
class BlockCache:
    """Keys and values of every canvas column outside `[start, end)`, frozen at the block's refresh."""

    kv: object  # transformers DynamicCache: the frozen columns, canvas order minus the window
    key_mask: Tensor  # [B, K]: their padding mask, in the same order
    start: int  # the window: canvas columns recomputed at every iteration
    end: int
    last_hidden: Tensor | None = None  # [B, H]: hidden state of column start-1 (prompt-causal + shift, first block)


def _window_of(denoiser, prefix: PrefixCache | None, slot_start: int, slot_end: int) -> tuple[int, int, bool]:
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
    return rebuilt_cache(kv, lambda t: torch.cat([t[:, :, :start], t[:, :, end:]], dim=2))


def refresh_block(denoiser, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, prefix: PrefixCache,
                  slot_start: int, slot_end: int) -> tuple[Tensor, BlockCache]:
    """Logits for `positions` from a forward over the canvas after the prompt cache `prefix` (exactly
    `denoiser(input_ids, attention_mask, positions=positions, cache=prefix)`), and the block cache for the
    block of canvas columns [slot_start, slot_end)."""
    from transformers import DynamicCache

    if prefix is None:
        raise ValueError("a block cache starts from the prompt's cache (Denoiser.prefix_cache)")
    k = prefix.length
    start, end, from_prefix = _window_of(denoiser, prefix, slot_start, slot_end)
    position_ids = position_ids_from_mask(attention_mask)
    kv = prefix.kv if k else DynamicCache()  # full layers: windows are cut by the masks (see the module docstring)
    with cropped_back(kv, k):
        hidden = denoiser.decode_into(input_ids[:, k:], attention_mask, position_ids[:, k:], kv)
        frozen = _frozen(kv, start, end)
    key_mask = torch.cat([attention_mask[:, :start], attention_mask[:, end:]], dim=1)
    cache = BlockCache(frozen, key_mask, start, end, prefix.last_hidden if from_prefix else None)
    return denoiser.head_at(hidden, k, positions, prefix.last_hidden), cache


def window_logits(denoiser, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache: BlockCache) -> Tensor:
    """Logits [N, V] for `positions` (which must lie in the block) from a forward over the window's columns
    alone, against the frozen keys and values."""
    start, end = cache.start, cache.end
    mask = torch.cat([cache.key_mask, attention_mask[:, start:end]], dim=1)
    position_ids = position_ids_from_mask(attention_mask)[:, start:end]
    with cropped_back(cache.kv, cache.key_mask.shape[1]):  # back to the frozen columns alone
        hidden = denoiser.decode_into(input_ids[:, start:end], mask, position_ids, cache.kv)
    return denoiser.head_at(hidden, start, positions, cache.last_hidden)


# -- the exact block cache of a block-causal run
#
# Under block-causal attention (lad/modeling/attention.py) a block never sees a later one, so once a block is
# finished its keys and values are final: they join the cache once and every later forward runs only the current
# block against the prompt and the finished blocks. Exact, unlike the dual cache above. A finished block joins
# either in the next block's first forward ("carry": one forward over both blocks, the finished one blind to the
# new one, its columns kept, SDAR/Fast-dLLM v2) or in a forward of its own (`carry=False`).


def query_rows(mask, first: int, end: int | None = None):
    """The query rows from canvas column `first` on of a decoder mask (one tensor or {layer type: tensor}); with
    `end`, the rows [first, end) over the key columns [0, end) (a forward that stops before the canvas does)."""
    if isinstance(mask, dict):
        return {kind: query_rows(m, first, end) for kind, m in mask.items()}
    return mask[:, :, first:] if end is None else mask[:, :, first:end, :end]


class GrowingCache:
    """The prompt's and every finished block's keys and values (canvas columns [0, length)), for a block-causal
    Denoiser. `extensions` counts the forwards spent only on adding a finished block (carry=False)."""

    def __init__(self, prefix: PrefixCache, block_size: int, carry: bool = True):
        from transformers import DynamicCache

        self.kv = prefix.kv if prefix.kv is not None else DynamicCache()
        self.ids, self.length = prefix.ids, prefix.length
        self.last_hidden = prefix.last_hidden  # [B, H] of column length-1 (shift: it predicts the next slot)
        self.block_size, self.carry, self.extensions = block_size, carry, 0

    def _run(self, denoiser, ids: Tensor, attention_mask: Tensor, answer_start: Tensor, end: int,
             keep: int) -> Tensor:
        """Hidden states of canvas columns [length, end) against the cache, block-causally; afterwards the cache
        holds columns [0, keep) (the finished ones), and `last_hidden` column keep-1's."""
        first = self.length
        if not torch.equal(ids[:, :first], self.ids.to(ids.device)):
            raise ValueError(f"the canvas no longer starts with its {first} cached columns (a finished block changed)")
        all_positions = position_ids_from_mask(attention_mask[:, :end])
        if denoiser.gated:  # finished blocks read causally, as a gated run trains them (they compute the parent)
            mask = denoiser.draft_mask(attention_mask[:, :end], keep, all_positions)
        else:
            mask = denoiser.attention_for(ids[:, :end], attention_mask[:, :end], answer_start,
                                          block_size=self.block_size)
        position_ids = all_positions[:, first:end]
        with cropped_back(self.kv, keep):  # the finished columns stay, the current block's go, however it ends
            hidden = denoiser.decode_into(ids[:, first:end], query_rows(mask, first), position_ids, self.kv)
        if keep > first:
            self.ids, self.length = ids[:, :keep].clone(), keep
            self.last_hidden = hidden[:, keep - first - 1] if denoiser.shift else None
        return hidden

    def block_logits(self, denoiser, ids: Tensor, attention_mask: Tensor, answer_start: Tensor, positions: Tensor,
                     start: int, end: int) -> Tensor:
        """Logits [N, V] for `positions` (bool [B, L], inside the block [start, end) of canvas columns) from a
        forward over the block against the prompt and the finished blocks; the finished blocks before `start`
        not yet cached join the cache first (carry=False: a forward of their own) or in this forward."""
        if not self.carry and self.length < start:
            self._run(denoiser, ids, attention_mask, answer_start, start, keep=start)
            self.extensions += 1
        first, before = self.length, self.last_hidden
        hidden = self._run(denoiser, ids, attention_mask, answer_start, end, keep=start)
        return denoiser.head_at(hidden, first, positions, before if denoiser.shift else None)
