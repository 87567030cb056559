"""`refine`: LAD's iterative refinement sampler.

Start from N mask tokens. Every iteration re-predicts EVERY answer slot from the current draft, then re-masks a
fraction of the slots that decays to zero over the iterations:

    linear:      r(i) = noise_start · (1 − (i+1)/iters)
    exponential: r(i) = noise_start · 0.01^((i+1)/iters)        (both exactly 0 at the last iteration)

Which slots are re-masked: `remask="random"`, or `"confidence"` (lowest-confidence first).
`noise_start=0` is *noiseless refinement*: after the first full prediction the whole draft is re-predicted from
itself, with no masks, until it stops changing — the model repairs wrong tokens without re-masking them, which
LAD's structural noise trained it to do.

Retention of slots that were left unmasked:
    none      any slot may be re-masked again later;
    editable  a kept slot is never re-masked, but its value may still change when re-predicted;
    locked    a kept slot is never re-masked and never changes.
Early stop: when the draft has no masks and has not changed for `early_stop` iterations (0 disables it).
Every iteration costs one forward (NFE ≤ iters). `prefix_cache=True` computes the prompt's keys and values once
and runs only the answer slots in each forward (an approximation: the prompt does not see the draft; see
docs/sampling.md).
"""

from __future__ import annotations

import time

import torch

from ..defaults import ITERS, MAX_NEW_TOKENS
from .common import (answer_logits, eos_token_ids, finish, prepare, record_step, row_generators, sample_tokens,
                     sampler_cache)
from .options import check_values


def remask_fraction(iteration: int, iters: int, noise_start: float, schedule: str = "linear") -> float:
    if iteration >= iters - 1 or noise_start <= 0:
        return 0.0
    progress = (iteration + 1) / iters
    if schedule == "linear":
        return noise_start * (1.0 - progress)
    if schedule == "exponential":
        return noise_start * 0.01 ** progress
    check_values(schedule=schedule)  # raises: not one of the schedules
    raise AssertionError(f"schedule {schedule!r} is declared in options.py but not implemented here")


def _check(iters: int, noise_start: float, schedule: str, remask: str, retention: str) -> None:
    check_values(iters=iters, noise_start=noise_start, schedule=schedule, remask=remask, retention=retention)


@torch.no_grad()
def refine(denoiser, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, iters: int = ITERS,
           seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, noise_start: float = 0.5,
           schedule: str = "linear", remask: str = "random", retention: str = "none", early_stop: int = 2,
           prefix_cache: bool | None = None, chat_template: bool = True, on_step=None, trace: bool = False):
    _check(iters, noise_start, schedule, remask, retention)
    started = time.perf_counter()
    canvas = prepare(denoiser, tokenizer, prompts, max_new_tokens, chat_template=chat_template)
    cache = sampler_cache(denoiser, canvas, prefix_cache)  # the prompt's K/V, computed once (or None)
    mask_id, rows, n = denoiser.mask_id, canvas.ids.shape[0], max_new_tokens
    generators = row_generators(rows, seed, canvas.ids.device)
    kept = torch.zeros(rows, n, dtype=torch.bool, device=canvas.ids.device)  # never re-masked again
    steps = [[] for _ in range(rows)] if trace else None
    unchanged, nfe = 0, 0
    for iteration in range(iters):
        before = canvas.answer.clone()
        logits = answer_logits(denoiser, canvas, cache)
        nfe += 1
        predicted, confidence = sample_tokens(logits, generators, temperature=temperature, top_k=top_k, top_p=top_p)
        predicted = predicted.to(before.device)
        draft = torch.where(kept, before, predicted) if retention == "locked" else predicted
        fraction = remask_fraction(iteration, iters, noise_start, schedule)
        eligible = ~kept if retention != "none" else torch.ones_like(kept)
        count = min(round(fraction * n), n)
        if count:
            if remask == "confidence":
                score = confidence.to(before.device).clone()
            else:
                score = torch.stack([torch.rand(n, generator=g, device=g.device) for g in generators]).to(before.device)
            score = score.masked_fill(~eligible, float("inf"))  # ineligible slots are never picked
            chosen = torch.zeros_like(kept)
            order = score.argsort(dim=-1)[:, :count]
            chosen.scatter_(1, order, True)
            chosen &= eligible
            draft = draft.masked_fill(chosen, mask_id)
        canvas.answer.copy_(draft)
        if retention != "none":
            kept |= draft != mask_id
        record_step(steps, on_step, iteration, before, draft, confidence, mask_id, nfe)
        stable = bool((draft == before).all()) and not bool((draft == mask_id).any())
        unchanged = unchanged + 1 if stable else 0
        if early_stop and unchanged >= early_stop:
            break
    return finish(tokenizer, canvas, "refine", nfe, started, eos_token_ids(tokenizer, denoiser), steps, mask_id,
                  cache)
