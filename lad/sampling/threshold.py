"""`threshold`: Fast-dLLM's confidence-aware parallel decoding, optionally in semi-autoregressive blocks.

Start from N mask tokens, split into blocks of `block_length` slots (one block of N by default) decoded left to
right. Every iteration predicts the masked slots of the current block and COMMITS every one whose predicted
token has probability >= `threshold` (τ), and at least one — the most confident — so every forward makes
progress. Committed tokens never change. Easy stretches (formatting, copied words, EOS padding) go many tokens
per forward; hard tokens one at a time.

Budget: each block may use `iters // n_blocks` iterations; at its last allowed iteration everything still masked
in it is committed, so NFE <= iters always (a block usually finishes sooner). `threshold=0` commits a whole block
per forward; `threshold > 1` commits one token per forward (pure confidence order).
`delay_eos=True`: an EOS candidate is committed only when no other masked slot is left in the block (or at the
forced last iteration) — the model cannot end the answer early because EOS is an easy, confident prediction.
`delay_repeats=True`: a masked slot predicting the same token as the masked slot just left of it is not committed
by τ, and is the forward's one forced commit only when nothing else is eligible (as in `confidence`: one forward
writes one likely word into several adjacent masks, and committing them together is how parallel decoding loops).

Rows advance independently: a row whose block is complete moves on to its next block at the next forward while
the others finish theirs, so a prompt's output is the same alone or in a batch. NFE counts the batch's forwards.
Fast-dLLM also caches K/V: `prefix_cache=True` computes the prompt's keys and values once and runs only the answer
slots in every forward (an approximation: the prompt does not see the canvas; docs/sampling.md); finished blocks
are still recomputed. NFE is unchanged. `block_cache=True` is Fast-dLLM's dual cache (lad/modeling/cache.py):
a block's first forward runs the whole answer and keeps everything else's keys and values, its later forwards
run the block's columns alone. The rows of a batch then share one block: a row that finishes early waits (its
canvas unchanged, its budget unspent) until every row has, so its output is still the same alone or in a batch,
while the batch may spend more forwards than without the cache.
Block-causal runs (attention: block_causal) decode in blocks of their trained length unless `block_length` says
otherwise; with the prompt's cache (the default) every finished block joins an exact cache (lad/modeling/cache.py:
`GrowingCache`) and a forward runs only the current block's columns. The rows then share one block as with the
block cache; `carry` as in `confidence`.
`stop_at_eos=True` (the default): a row whose text is final (an EOS with every slot before it committed) is done;
its later blocks would only fill slots that `finish` cuts off. The same text in fewer forwards, as AR stops at EOS.
"""

from __future__ import annotations

import time

import torch

from ..defaults import ITERS, MAX_NEW_TOKENS
from .common import (decode_blocks, eos_token_ids, extra_forwards, finish, growing_cache, held_back, predict_slots,
                     prepare, rank_held_back_last, record_step, row_generators, sampler_cache, settled)
from .confidence import blocks_of
from .options import check_values


@torch.no_grad()
def threshold(denoiser, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, iters: int = ITERS,
              seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, threshold: float = 0.9,
              block_length: int | None = None, delay_eos: bool = False, delay_repeats: bool = False,
              prefix_cache: bool | None = None, block_cache: bool = False, carry: bool = True,
              stop_at_eos: bool = True, chat_template: bool = True, on_step=None, trace: bool = False):
    tau = threshold
    check_values(threshold=tau)  # also refuses NaN
    started = time.perf_counter()
    canvas = prepare(denoiser, tokenizer, prompts, max_new_tokens, chat_template=chat_template)
    block_length, n_blocks, budget = blocks_of(max_new_tokens, iters, decode_blocks(denoiser, canvas, block_length))
    cache = sampler_cache(denoiser, canvas, prefix_cache, block_cache)  # the prompt's K/V, computed once (or None)
    exact = growing_cache(denoiser, canvas, cache, carry)  # block-causal: finished blocks cached exactly
    shared_blocks = block_cache or exact is not None  # the rows decode one block together
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    mask_id, rows, n, device = denoiser.mask_id, canvas.ids.shape[0], max_new_tokens, canvas.ids.device
    generators = row_generators(rows, seed, device)
    eos_ids = eos_token_ids(tokenizer, denoiser)
    eos_tensor = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    steps = [[] for _ in range(rows)] if trace else None
    block = torch.zeros(rows, dtype=torch.long, device=device)  # each row's current block
    used = torch.zeros(rows, dtype=torch.long, device=device)  # iterations spent on it
    slot_block = torch.arange(n, device=device) // block_length  # [n]: the block of each slot
    nfe, state, cached_block = 0, None, None
    while bool((block < n_blocks).any()):
        before = canvas.answer.clone()
        shared = int(block.min()) if shared_blocks else None  # the block every row is on or waits for
        if exact is not None:
            state = exact
        elif block_cache and shared != cached_block:
            state, cached_block = None, shared  # a new block: refresh the dual cache
        window = (shared * block_length, (shared + 1) * block_length) if shared_blocks else None
        predicted, conf, state = predict_slots(denoiser, canvas, cache, generators, sampling, window, state)
        nfe += 1
        eligible = (slot_block[None, :] == block[:, None]) & (before == mask_id)  # done rows: nothing eligible
        if shared_blocks:
            eligible &= block[:, None] == shared  # rows ahead wait for the others
        is_eos, repeats = held_back(predicted, before == mask_id, eos_tensor, delay_eos, delay_repeats)
        commit = eligible & (conf >= tau) & ~is_eos & ~repeats
        # at least one per row: the most confident (non-EOS, non-repeat first when delaying them; conf is in [0, 1])
        priority = rank_held_back_last(conf, is_eos, repeats).masked_fill(~eligible, float("-inf"))
        commit |= torch.zeros_like(eligible).scatter_(1, priority.argmax(-1, keepdim=True), True) & eligible
        others_left = (eligible & ~is_eos & ~commit).any(dim=-1, keepdim=True)
        commit |= eligible & (conf >= tau) & is_eos & ~others_left  # EOS once nothing else is left
        used += eligible.any(dim=-1)  # a waiting row spends none of its block's budget
        last_chance = (used >= budget)[:, None]
        commit |= eligible & last_chance  # the block's last allowed iteration: commit everything left
        draft = torch.where(commit, predicted, before)
        canvas.answer.copy_(draft)
        record_step(steps, on_step, nfe - 1, before, draft, conf, mask_id, nfe + extra_forwards(exact))
        complete = ~((slot_block[None, :] == block[:, None]) & (draft == mask_id)).any(dim=-1)
        complete &= block < n_blocks
        block = torch.where(complete, block + 1, block)
        if stop_at_eos:  # a final text needs no more blocks
            block = torch.where(settled(draft, eos_tensor, mask_id), torch.full_like(block, n_blocks), block)
        used = torch.where(complete, torch.zeros_like(used), used)
    return finish(tokenizer, canvas, "threshold", nfe + extra_forwards(exact), started, eos_ids, steps, mask_id,
                  cache)
