"""`score_blocks`: a block-causal run's exact left-to-right log-likelihood of a continuation, in one forward.

Revealing a continuation left to right one token at a time (`score_denoise`, order "l2r", iters >= its length)
costs one forward per token. Under block-causal attention (lad/modeling/attention.py) the token at offset j of
block k sees only the context, the clean blocks before k and its own block with offsets < j revealed and >= j
masked, so every such state can sit in one sequence, as in one-pass training (lad/training/blocks.py):

    [ context | clean continuation | block 0 with 0, 1, 2, ... tokens revealed | block 1 ... ]

each copy reading the context and the clean blocks before its own and itself only (`attention.layout_allowed`), at
its block's positions. Token j of block k is read from copy j (with the shift: from copy j's column j-1; the
block's first token from the clean token before the block), which is exactly what the one-token-per-forward
reveal computes, up to float rounding: the same chain rule, log p(x) = Σ_i log p(x_i | c, x_<i), in one forward
of (context + L·(1 + block)) columns instead of L forwards. `lad-eval` uses it for block-causal runs scored left to
right; `iters` does not apply (the chain rule is always the exact one-token-at-a-time one).
"""

from __future__ import annotations

import torch

from ..modeling.attention import ANSWER, NOISY, PROMPT
from .batching import check_requests, count, device_of, length_chunks


def block_row(context: list[int], continuation: list[int], block_size: int, shift: bool, mask_id: int,
              lookahead: int | None = None):
    """(ids, position ids, kinds, blocks, source column of each continuation token) of one request's row.

    lookahead W: the copy that scores offset j of a block holds min(W, block_size - j) masks after the revealed
    tokens, past the continuation's end if need be (as `score_denoise(lookahead=W)` shows them; masks beyond the
    block would be invisible anyway), so the last block no longer tells where the continuation ends. None: the
    block's masks up to the continuation's end."""
    start = len(context)
    ids, kinds, blocks = context + continuation, [PROMPT] * start + [ANSWER] * len(continuation), [0] * start
    blocks += [offset // block_size for offset in range(len(continuation))]
    positions, sources = list(range(len(ids))), []
    for first in range(0, len(continuation), block_size):
        size = min(block_size, len(continuation) - first)
        for j in range(size):
            if shift and j == 0:  # the block's first token: from the clean token before it
                sources.append(start + first - 1)
                continue
            column, masks = len(ids), size - j if lookahead is None else min(lookahead, block_size - j)
            ids += continuation[first:first + j] + [mask_id] * masks
            positions += range(start + first, start + first + j + masks)
            kinds += [NOISY + j] * (j + masks)
            blocks += [first // block_size] * (j + masks)
            sources.append(column + j - int(shift))
    return ids, positions, kinds, blocks, sources


@torch.no_grad()
def score_blocks(denoiser, requests, *, batch_size: int = 16, lookahead: int | None = None, progress=None,
                 stats: dict | None = None, per_token: list | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per request, in request order; stats["nfe"] += requests run (one forward each).
    lookahead: as `block_row`'s. per_token: if given (a list), filled with each request's token log-probabilities
    (the terms of its sum), in request order, for analyses by position (eval/token_offsets.py)."""
    requests = check_requests(requests, need_context=denoiser.shift)
    denoiser.eval()
    device, results, tokens = device_of(denoiser), [None] * len(requests), [None] * len(requests)
    rows_of = {i: block_row(*requests[i], denoiser.block_size, denoiser.shift, denoiser.mask_id, lookahead)
               for i in range(len(requests))}
    for chunk in length_chunks([len(rows_of[i][0]) for i in range(len(requests))], batch_size):
        width = max(len(rows_of[i][0]) for i in chunk)
        tensors = {name: torch.zeros((len(chunk), width), dtype=torch.long) for name in
                   ("ids", "mask", "positions", "kinds", "blocks")}
        flat = []
        for row, i in enumerate(chunk):
            ids, positions, kinds, blocks, sources = rows_of[i]
            n = len(ids)
            for name, values in (("ids", ids), ("positions", positions), ("kinds", kinds), ("blocks", blocks)):
                tensors[name][row, :n] = torch.tensor(values)
            tensors["mask"][row, :n] = 1
            flat += [row * width + s for s in sources]
        t = {name: value.to(device) for name, value in tensors.items()}
        mask = denoiser.layout_mask(t["kinds"], t["blocks"], t["mask"], t["positions"])
        log_probs = denoiser(t["ids"], mask, position_ids=t["positions"],
                             sources=torch.tensor(flat, device=device)).float().log_softmax(-1)
        count(stats, rows=len(chunk))
        at = 0
        for i in chunk:
            truth = torch.tensor(requests[i][1], device=device)
            part = log_probs[at:at + len(truth)]
            at += len(truth)
            terms = part.gather(-1, truth[:, None])[:, 0]
            results[i] = (float(terms.sum()), bool((part.argmax(-1) == truth).all()))
            if per_token is not None:
                tokens[i] = terms.tolist()
        if progress is not None:
            progress(len(chunk))
    if per_token is not None:
        per_token[:] = tokens
    return results
