"""`score_denoise`: log-likelihood of a continuation by revealing it over a few iterations (any-order chain rule).

For one request (context c, continuation x of L tokens), with S = min(iters, L) iterations (S = L, one token per
step, when iters is None: the default, lad/defaults.py SCORE_ITERS):

    canvas = c + [MASK] * L
    quotas = num_transfer_tokens(L, S)          # LLaDA: L // S per iteration, the first L % S one more
    logp, greedy = 0, True
    for quota in quotas:
        p = softmax(denoiser(canvas))           # one forward, read at the still-masked slots
        pick `quota` masked slots:              # the order never looks at the true tokens
            order="confidence": the highest max_v p[slot, v] (the model's own confidence), ties by position
            order="l2r":        the leftmost
        for slot in picked:
            logp   += log p[slot, x[slot]]      # the TRUE token's log-prob at the moment it is revealed
            greedy &= argmax p[slot] == x[slot]
            canvas[slot] = x[slot]              # reveal the true token, not the prediction
    return logp, greedy

With iters >= L it reveals one token per iteration: log p(x) = Σ_t log p(x_{σ(t)} | c, x_{σ(<t)}) for the order σ
the model picks, an exact chain rule for the denoiser's conditionals. With fewer iterations the tokens revealed
together are scored as independent (a product of marginals). Deterministic; a single-token continuation costs
exactly one forward.

The canvas holds one mask per continuation token, so every conditional also knows where the continuation ends:
the score is log p(x | c, |x|) rather than log p(x | c). `lookahead=W` (l2r) shows each forward the revealed text
and exactly W masks instead, past the end if need be, so every continuation looks equally long (measured to change
little; docs/scoring.md, "Why one token per step (the default), and `--lookahead`").

Batching: contexts are left-padded and continuations right-padded (`ContextBatch`), so every continuation starts at
one column. Each row follows its own schedule; a row whose schedule is over leaves the batch (later forwards run
only the rows still being revealed). `prefix_cache` (on by default for prompt-causal runs, where it is exact):
the contexts' keys and values are computed once per call (a question's choices side by side share them, also
across a chunk boundary: `KeptContexts`, lad/modeling/cache.py) and every reveal step runs only the continuation
columns; a context costs one forward, not `iters`.
"""

from __future__ import annotations

import torch

from ..defaults import SCORE_ITERS
from ..modeling.cache import KeptContexts
from ..sampling.confidence import num_transfer_tokens  # the samplers' reveal schedule, shared
from .blocks import score_blocks
from .batching import (check_requests, context_batch, context_chunks, count, device_of, length_chunks, pad_id_of,
                       use_prefix_cache)

ORDERS = ("confidence", "l2r")


@torch.no_grad()
def score_denoise(denoiser, requests, *, iters: int | None = SCORE_ITERS, order: str = "l2r", batch_size: int = 16,
                  prefix_cache: bool | None = None, one_pass: bool | None = None, lookahead: int | None = None,
                  progress=None, stats: dict | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per request, in request order.

    iters: reveal steps per continuation, at most its length; None: one token per step (the exact chain rule).

    one_pass (default: on for a block-causal run scored left to right): every token's reveal state in one forward
    (`score_blocks`, lad/scoring/blocks.py), the exact one-token-at-a-time chain rule whatever `iters` says.

    lookahead (l2r only; None: the whole continuation): each forward shows exactly this many masks after the
    revealed text (at least the step's quota), past the continuation's end if need be, and nothing further, so
    the canvas no longer tells the model how long the continuation is (`visible_window`).

    progress(n): called after each chunk with the number of requests it finished (tqdm's `update`).
    stats: if given, stats["nfe"] += sequences run through the model (Σ min(iters, L) over requests),
    stats["forward_calls"] += batched forwards, and with the cache stats["prefix_rows"] += contexts run.
    """
    if iters is not None and int(iters) < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if lookahead is not None and (int(lookahead) < 1 or order != "l2r"):
        raise ValueError(f"lookahead must be >= 1 and needs order='l2r', got {lookahead} with order={order!r}")
    if one_pass is None:
        one_pass = denoiser.block_causal and order == "l2r"
    if one_pass:
        return score_blocks(denoiser, requests, batch_size=batch_size, lookahead=lookahead, progress=progress,
                            stats=stats)
    requests = check_requests(requests, need_context=denoiser.shift)
    cached = use_prefix_cache(denoiser, prefix_cache)
    denoiser.eval()
    device, pad_id = device_of(denoiser), pad_id_of(denoiser)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    if cached:  # a question's choices side by side, so that their context is run once
        chunks, kept = context_chunks(requests, batch_size), KeptContexts()
    else:
        chunks, kept = length_chunks([len(c) + len(x) for c, x in requests], batch_size), None

    for chunk in chunks:
        batch = context_batch(denoiser, [requests[i] for i in chunk], pad_id, device, cached, stats, kept)
        logp, greedy = _reveal_chunk(denoiser, batch, iters, order, lookahead, stats)
        for row, i in enumerate(chunk):
            results[i] = (float(logp[row]), bool(greedy[row]))
        if progress is not None:
            progress(len(chunk))
    return results


def _reveal_chunk(denoiser, batch, iters: int | None, order: str, lookahead: int | None, stats):
    """(log-likelihood [rows] float64, is_greedy [rows] bool) of one batch of requests: their continuations
    revealed `order` first, each step's revealed tokens scored against the canvas before them."""
    mask_id, device = denoiser.mask_id, batch.ids.device
    target, attention, lengths = batch.ids, batch.attention_mask, batch.lengths
    masked = batch.slots()  # continuation slots not revealed yet
    if lookahead is not None:  # room for the masks shown past a continuation's end
        target, attention, masked = (torch.nn.functional.pad(t, (0, int(lookahead)))
                                     for t in (target, attention, masked))
    rows = target.shape[0]
    canvas = target.masked_fill(masked, mask_id)
    schedules = [num_transfer_tokens(length, length if iters is None else min(int(iters), length))
                 for length in lengths]
    logp = torch.zeros(rows, dtype=torch.float64, device=device)
    greedy = torch.ones(rows, dtype=torch.bool, device=device)
    cache, cache_rows = batch.cache, rows  # the cache of the live rows

    for step in range(max(len(s) for s in schedules)):
        live = torch.tensor([r for r in range(rows) if step < len(schedules[r])], device=device)
        if cache is not None and len(live) != cache_rows:  # rows only ever leave
            cache, cache_rows = batch.cache.select(live), len(live)
        quota = torch.tensor([schedules[r][step] for r in live.tolist()], device=device)
        slots, view, shown, keep = step_view(masked[live], canvas[live], attention[live], quota, order,
                                             lookahead, batch.context_width, mask_id)
        log_probs = denoiser(view[:, :keep], shown[:, :keep], positions=slots[:, :keep], cache=cache,
                             answer_start=batch.answer_start[live]).float().log_softmax(-1)  # [N, V]
        count(stats, rows=len(live))
        truth = target[live]
        true_lp = torch.zeros(slots.shape, dtype=torch.float32, device=device)
        true_lp[slots] = log_probs.gather(-1, truth[slots].unsqueeze(-1)).squeeze(-1)
        is_argmax = torch.zeros_like(slots)
        is_argmax[slots] = log_probs.argmax(-1) == truth[slots]
        # the true token plays no part in which slots are revealed; l2r: step_view kept only those
        reveal = most_confident(log_probs, slots, quota) if order == "confidence" else slots
        logp[live] += torch.where(reveal, true_lp, 0.0).sum(-1).double()
        greedy[live] &= ~(reveal & ~is_argmax).any(-1)
        canvas[live] = torch.where(reveal, truth, canvas[live])
        masked[live] = masked[live] & ~reveal
    return logp, greedy


def most_confident(log_probs, slots, quota):
    """Bool like `slots`: each row's `quota` slots of highest max-probability (ties: the leftmost)."""
    priority = torch.full(slots.shape, float("-inf"), device=slots.device)
    priority[slots] = log_probs.max(-1).values  # log of the max probability: same order
    ranked = priority.sort(dim=-1, descending=True, stable=True).indices  # stable: ties by position
    reveal = torch.zeros_like(slots)
    reveal.scatter_(1, ranked, torch.arange(slots.shape[1], device=slots.device).expand_as(ranked) < quota[:, None])
    return reveal


def step_view(masked, canvas, attention, quota, order: str, lookahead: int | None, start: int, mask_id: int):
    """(slots to read, canvas, attention, columns to run) of one reveal step: with a lookahead only its window
    (`visible_window`); left to right only the slots revealed now are read (a small model's LM head costs much)."""
    keep = canvas.shape[1]
    if lookahead is not None:
        canvas, attention, keep = visible_window(canvas, attention, masked, quota, int(lookahead), start, mask_id)
        masked = masked & attention.bool()
    if order == "l2r":
        masked = masked & (masked.cumsum(-1) <= quota[:, None])
    return masked, canvas, attention, keep


def visible_window(canvas, attention, masked, quota, lookahead: int, start: int, mask_id: int):
    """(canvas, attention, columns to run) for a `lookahead` forward: each row shows its revealed text and then
    exactly max(lookahead, quota) masks, continuing past the continuation's end with extra masks (never scored),
    so that every continuation looks equally long; columns right of the widest window need not be run."""
    column = torch.arange(canvas.shape[1], device=canvas.device)
    revealed = masked.int().argmax(-1)  # l2r: each row's first masked column (a live row has one)
    end = revealed + quota.clamp(min=lookahead)
    window = (column >= start) & (column < end[:, None])
    canvas = torch.where(window & (column >= revealed[:, None]), torch.full_like(canvas, mask_id), canvas)
    attention = torch.where(column >= start, window.to(attention.dtype), attention)
    return canvas, attention, int(end.max())
