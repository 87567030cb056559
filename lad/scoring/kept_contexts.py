"""Contexts' keys and values kept from one batch to the next, so that a scoring run computes each context once.

A scorer with the prefix cache runs each batch's distinct contexts once (`context_batch`). Without keeping them,
a request whose rows span several batches (score_elbo's M + 1 sequences per choice: 8 or 9 batches of 16 at
M = 128) runs its context again in every one. `KeptContexts` holds each context's keys and values on their own
(one row, no padding) while batches still use it: a batch computes only the contexts the batch before did not
have, together in one forward, and lays the rows it needs side by side, left-padded to the longest. Scorers order
requests so that the rows of one context are consecutive (`context_order`), so a context that leaves a batch
never comes back and is dropped; any other order stays exact, it only computes some contexts again.

Left padding is exact: padded columns are masked out of attention and position ids come from the mask, so a
context's keys and values do not depend on which batch computed them (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import torch

from ..modeling.denoiser import PrefixCache, rebuilt_cache


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


class KeptContexts:
    """Each distinct context's single-row cache, kept while consecutive batches use it."""

    def __init__(self):
        self.kept: dict[tuple[int, ...], PrefixCache] = {}

    def cache_for(self, denoiser, contexts: list[tuple[int, ...]], pad_id: int, device,
                  stats: dict | None = None) -> PrefixCache:
        """The cache of a batch whose row i has context `contexts[i]` (repeats share one computation), left-padded
        to the longest; the contexts the previous batch did not have run together in one forward.
        stats["prefix_rows"] += contexts computed."""
        from .batching import pad_batch

        distinct = list(dict.fromkeys(contexts))
        new = [c for c in distinct if c not in self.kept]
        if new:
            ids, mask = pad_batch([list(c) for c in new], pad_id, side="left", device=device)
            self.kept.update(zip(new, split_rows(denoiser.prefix_cache(ids, mask))))
            if stats is not None:
                stats["prefix_rows"] = stats.get("prefix_rows", 0) + len(new)
        self.kept = {c: self.kept[c] for c in distinct}  # the others do not come back (context_order)
        return stacked([self.kept[c] for c in contexts], pad_id)
