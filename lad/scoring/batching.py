"""What every scorer shares: validating requests, ordering them by length, padding them into a batch.

A request is `(context_ids, continuation_ids)`, already tokenized and split as lm-eval's `hf` model splits it.
Scorers sort requests by total length (longest first, as lm-eval does: similar lengths share a batch, so little
padding, and an out-of-memory shows up at once), score them in chunks, and hand results back in request order.

Padding is exact either way: the bidirectional denoiser masks padding and derives position ids from the
attention mask (so LEFT padding does not move positions), and the causal AR parent never looks right of a token
(so RIGHT padding is invisible to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..modeling.attention import answer_start_at
from ..modeling.cache import KeptContexts

Request = tuple[Sequence[int], Sequence[int]]


def check_requests(requests: Sequence[Request], *, need_context: bool = False) -> list[tuple[list[int], list[int]]]:
    """Requests as lists of ints; ValueError on an empty continuation (or context, when one is needed)."""
    out = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(map(int, context)), list(map(int, continuation))
        if not continuation:
            raise ValueError(f"request {i}: the continuation is empty")
        if need_context and not context:
            raise ValueError(f"request {i}: the context is empty (nothing to predict the first token from; "
                             "lm-eval passes the prefix token as context in that case)")
        out.append((context, continuation))
    return out


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices sorted longest first (ties by index, so deterministic)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def chunked(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """`order` cut into chunks of `batch_size`."""
    batch_size = check_batch_size(batch_size)
    return [list(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]


def length_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted longest first (ties by index), cut into chunks of `batch_size`."""
    return chunked(longest_first(lengths), batch_size)


def context_order(requests: Sequence[Request]) -> list[int]:
    """Request indices for scoring with the prefix cache: a question's choices side by side (so that their
    context runs once), longest contexts first, then longest continuations (ties by index)."""
    return sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]), tuple(requests[i][0]),
                                                       -len(requests[i][1]), i))


def context_chunks(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """`context_order` cut into chunks of `batch_size`, for `context_batch` with the cache."""
    return chunked(context_order(requests), batch_size)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "left",
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(ids [B, W], attention_mask [B, W]) with W the longest sequence; padding on `side` ("left" or "right")."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        attention[row, span] = 1
    return ids.to(device), attention.to(device)


@dataclass
class ContextBatch:
    """Requests laid out for a cached forward: each context LEFT-padded to `context_width` columns, then its
    continuation RIGHT-padded, so every continuation starts at column `context_width` and the contexts form a
    common prefix that `Denoiser.prefix_cache` can compute once. Exact as the whole-sequence left padding is:
    padding is masked and position ids come from the mask."""

    ids: Tensor  # [B, C + X]
    attention_mask: Tensor  # [B, C + X]
    context_width: int  # C
    lengths: list[int]  # continuation lengths
    cache: object  # the contexts' PrefixCache (each distinct context run once), or None

    @property
    def answer_start(self) -> Tensor:
        return answer_start_at(self.context_width, self.ids.shape[0], self.ids.device)

    def slots(self) -> Tensor:
        """Bool [B, C + X]: each row's continuation columns."""
        column = torch.arange(self.ids.shape[1], device=self.ids.device)
        length = torch.tensor(self.lengths, device=self.ids.device)
        return (column >= self.context_width) & (column < self.context_width + length[:, None])


def context_batch(denoiser, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device,
                  cached: bool, stats: dict | None = None, kept: KeptContexts | None = None) -> ContextBatch:
    """`pairs` (context, continuation) as a `ContextBatch`; with `cached`, the contexts' keys and values are
    computed once per distinct context (the choices of one question share theirs) and laid out per row; pass
    the same `kept` to consecutive batches to compute a context once for all of them. stats["prefix_rows"]
    counts the contexts run."""
    left, left_mask = pad_batch([c for c, _ in pairs], pad_id, side="left", device=device)
    right, right_mask = pad_batch([x for _, x in pairs], pad_id, side="right", device=device)
    cache = None
    if cached:
        kept = KeptContexts() if kept is None else kept
        cache = kept.cache_for(denoiser, [tuple(c) for c, _ in pairs], pad_id, device, stats)
    return ContextBatch(torch.cat([left, right], 1), torch.cat([left_mask, right_mask], 1), left.shape[1],
                        [len(x) for _, x in pairs], cache)


def use_prefix_cache(denoiser, prefix_cache: bool | None) -> bool:
    """As given, or when None on exactly when it is exact: a prompt-causal model's context never sees its
    continuation, so computing the context alone once changes nothing (docs/scoring.md)."""
    if prefix_cache is None:
        return denoiser.prefix_cache_exact
    return bool(prefix_cache)


def pad_id_of(denoiser) -> int:
    """The config's pad id, or 0: padded columns are masked out of attention, so any id would do."""
    pad = getattr(denoiser.config, "pad_token_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else 0


def device_of(module) -> torch.device:
    return next(module.parameters()).device


def count(stats: dict | None, *, rows: int) -> None:
    """Record one batched forward of `rows` sequences: stats["nfe"] counts sequences through the model (does not
    depend on the batch size), stats["forward_calls"] counts batched calls."""
    if stats is not None:
        stats["nfe"] = stats.get("nfe", 0) + int(rows)
        stats["forward_calls"] = stats.get("forward_calls", 0) + 1
