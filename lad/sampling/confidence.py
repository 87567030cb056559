"""`confidence`: LLaDA's sampler (low-confidence remasking), optionally in semi-autoregressive blocks.

Start from N mask tokens, split into blocks of `block_length` slots (one block of N by default) decoded left to
right. Each block gets `steps = iters // n_blocks` iterations. Every iteration predicts every masked slot of the
current block, then COMMITS a fixed number of them; committed tokens never change, the rest stay masked.

How many per iteration (LLaDA's `get_num_transfer_tokens`): a block of m masks over s steps commits m // s per
step, and the first m % s steps one more, so the block is complete after its last step.
Which ones: `remask="confidence"` commits the slots whose predicted token has the highest probability (LLaDA's
"low_confidence" remasking: the least confident stay masked); `remask="random"` commits random slots.
`delay_eos=True` gives EOS candidates the lowest priority, so EOS is committed only once the quota cannot be
filled otherwise — the model cannot end the answer early just because EOS is an easy, confident prediction.
`delay_repeats=True` gives the lowest priority (below EOS) to a masked slot that predicts the same token as the
masked slot just left of it: one forward writes one likely word into several adjacent masks ("Japan Japan
Japan"), and committing them together is how parallel decoding loops; the slot waits until its left neighbour
is committed and is then predicted knowing it. It changes only which slots a forward commits, never how many.

`iters` is the NFE budget: one forward per iteration, NFE = n_blocks · steps (== iters when iters is a multiple
of the number of blocks). LLaDA runs forwards that commit nothing when steps > block_length; we cap steps at
block_length instead (same output, no wasted forwards). LLaDA is at its best with steps = tokens; its
answers may contain text after EOS, which `finish` cuts off.
`prefix_cache=True`: the prompt's keys and values are computed once and every forward runs only the answer
slots (an approximation: the prompt does not see the canvas; see docs/sampling.md). NFE is unchanged.
`block_cache=True` (Fast-dLLM's dual cache): each block's first forward runs the whole answer and keeps the keys
and values of everything outside the block; the block's other forwards run its columns alone against them
(an approximation: the frozen columns do not see the block's new tokens until the next block). NFE is unchanged;
a forward costs the block's width, not the answer's. Only the block's slots are predicted then (the others
report confidence 0 in the trace).
Block-causal runs (attention: block_causal) decode in blocks of their trained length unless `block_length` says
otherwise, and with the prompt's cache (the default) every finished block joins an exact cache
(lad/modeling/cache.py: `GrowingCache`), so a forward runs only the current block's columns; `carry=True` adds a
finished block in the next block's first forward, `carry=False` in a forward of its own (counted in NFE).
`stop_at_eos=True` (the default) ends the loop once every row's text is final (an EOS with every slot before it
committed): the same text, fewer forwards, as AR generation stops at EOS. NFE then falls short of the budget.
"""

from __future__ import annotations

import time

import torch

from ..defaults import ITERS, MAX_NEW_TOKENS
from .common import (decode_blocks, eos_token_ids, extra_forwards, finish, growing_cache, held_back, predict_slots,
                     prepare, rank_held_back_last, record_step, row_generators, sampler_cache, settled)
from .options import check_values


def num_transfer_tokens(masked: int, steps: int) -> list[int]:
    """LLaDA's schedule: `masked` commits spread over `steps` (masked // steps each, remainder to the first)."""
    base, remainder = divmod(masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def blocks_of(max_new_tokens: int, iters: int, block_length: int | None) -> tuple[int, int, int]:
    """(block_length, n_blocks, iterations per block) for a budget of `iters` forwards; ValueError if impossible."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    block_length = max_new_tokens if block_length is None else block_length
    if block_length < 1 or max_new_tokens % block_length:
        raise ValueError(f"block_length must divide max_new_tokens ({max_new_tokens}), got {block_length}")
    n_blocks = max_new_tokens // block_length
    if iters < n_blocks:
        raise ValueError(f"iters ({iters}) must be at least the number of blocks ({n_blocks} blocks of "
                         f"{block_length}): every block needs one forward")
    return block_length, n_blocks, iters // n_blocks


@torch.no_grad()
def confidence(denoiser, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, iters: int = ITERS,
               seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               block_length: int | None = None, remask: str = "confidence", delay_eos: bool = False,
               delay_repeats: bool = False,
               prefix_cache: bool | None = None, block_cache: bool = False, carry: bool = True,
               stop_at_eos: bool = True, chat_template: bool = True, on_step=None, trace: bool = False):
    check_values(remask=remask)
    started = time.perf_counter()
    canvas = prepare(denoiser, tokenizer, prompts, max_new_tokens, chat_template=chat_template)
    block_length, n_blocks, steps_per_block = blocks_of(max_new_tokens, iters,
                                                        decode_blocks(denoiser, canvas, block_length))
    cache = sampler_cache(denoiser, canvas, prefix_cache, block_cache)  # the prompt's K/V, computed once (or None)
    exact = growing_cache(denoiser, canvas, cache, carry)  # block-causal: finished blocks cached exactly
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    mask_id, rows, n, device = denoiser.mask_id, canvas.ids.shape[0], max_new_tokens, canvas.ids.device
    generators = row_generators(rows, seed, device)
    eos_ids = eos_token_ids(tokenizer, denoiser)
    eos_tensor = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    steps = [[] for _ in range(rows)] if trace else None
    steps_per_block = min(steps_per_block, block_length)  # more would be forwards that commit nothing
    quotas = num_transfer_tokens(block_length, steps_per_block)
    iteration, final = 0, False
    for block in range(n_blocks):
        if final:
            break  # every answer is final: the blocks left would only fill slots after its EOS
        in_block = torch.zeros(rows, n, dtype=torch.bool, device=device)
        in_block[:, block * block_length:(block + 1) * block_length] = True
        window = (block * block_length, (block + 1) * block_length) if block_cache or exact is not None else None
        state = exact  # the exact cache, or the dual cache refreshed by the block's first forward (None)
        for quota in quotas:
            before = canvas.answer.clone()
            predicted, conf, state = predict_slots(denoiser, canvas, cache, generators, sampling, window, state)
            if remask == "confidence":
                priority = conf.clone()
            else:
                priority = torch.stack([torch.rand(n, generator=g, device=g.device) for g in generators]).to(device)
            priority = rank_held_back_last(priority, *held_back(predicted, before == mask_id, eos_tensor, delay_eos,
                                                                delay_repeats))
            eligible = in_block & (before == mask_id)
            priority = priority.masked_fill(~eligible, float("-inf"))
            chosen = torch.zeros_like(eligible)
            chosen.scatter_(1, priority.topk(quota, dim=-1).indices, True)  # quota <= masks left in the block
            draft = torch.where(chosen, predicted, before)
            canvas.answer.copy_(draft)
            iteration += 1
            record_step(steps, on_step, iteration - 1, before, draft, conf, mask_id, iteration + extra_forwards(exact))
            final = stop_at_eos and bool(settled(draft, eos_tensor, mask_id).all())
            if final:
                break
    return finish(tokenizer, canvas, "confidence", iteration + extra_forwards(exact), started, eos_ids, steps,
                  mask_id, cache)
