"""Noiseless refinement of a finished draft: `--polish N` after any strategy, and the repair benchmark's passes.

A pass re-predicts every answer slot from the draft as it stands (no masks) and keeps the model's greedy token at
each: what LAD's structural noise trains a denoiser to do (repair a wrong token without re-masking it). Where the
model already prefers the draft's token the pass changes nothing, so a draft the model is certain of is never
changed, and a pass that changes nothing ends the polishing (greedy passes would repeat it). A block-causal run's
forward reads every block against the draft's earlier blocks, as its training read clean earlier blocks, so one
forward polishes every block within itself.

Who fills (`polish_with`, measured by issue 31's repair benchmark): the denoiser always flags (a slot whose token it
gives less than `keep`), and a flagged slot takes the greedy token of the denoiser (`denoiser`), of the AR parent
(`parent`), or of the product of the two distributions (`both`: the denoiser reads the right context, the parent
the left with all its pretraining). The parent fills left to right, reading the answer as repaired so far
(lad/sampling/parent_fill.py: one parent forward per slot changed, over a K/V cache), and with `doubt` < 1 a
flagged slot changes only where the parent, too, gives its token less than `doubt`. Filling every flagged slot
at once from the draft as it stood (2026-12-07) repaired fewer; letting the parent or the product judge alone
damages far more (eval/results/repair/prototypes/).

`polish_canvas` works on a canvas (ids in, ids out); `polish` rebuilds the canvas of finished `Generation`s (the
answer, its end, then end tokens to the canvas width) so that it follows any strategy, the AR parent's included.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..defaults import POLISH_DOUBT, POLISH_KEEP, POLISH_WITH
from .common import (Generation, answer_logits, build_canvas, decode_blocks, eos_token_ids, record_step,
                     sampler_cache)
from .options import check_values
from .parent_fill import fill_left_to_right


def check_filler(info, with_: str, where, name: str = "polish_with") -> None:
    """RunDirError when `with_` asks the AR parent and the run holds none (a merged export, a full fine-tune);
    `name`: the setting as the caller typed it (--polish-with on the command line)."""
    from ..run import RunDirError, check_parent

    if with_ != "denoiser" and info is not None:
        try:
            check_parent(info, where)
        except RunDirError as err:
            raise RunDirError(f"{name} {with_} fills from the AR parent, but {err}; polish with the denoiser alone "
                              f"({name} denoiser)") from None


def polish_pass(denoiser, canvas, cache, editable, keep: float, with_: str, doubt: float = POLISH_DOUBT):
    """One pass over `canvas.answer`, in place: the denoiser flags the editable slots whose token it gives less
    than `keep`, and `with_` fills them, the parent left to right (lad/sampling/parent_fill.py; asked only when a
    slot is flagged). Returns (the filler's confidence per slot, forwards spent)."""
    log_probs = answer_logits(denoiser, canvas, cache).float().log_softmax(-1)
    answer = canvas.answer
    current = log_probs.gather(-1, answer.to(log_probs.device).unsqueeze(-1)).squeeze(-1).exp()
    flagged = editable.to(answer.device) & (current < keep).to(answer.device)
    confidence, predicted = log_probs.exp().max(-1)
    confidence = confidence.to(answer.device)
    if with_ == "denoiser" or not bool(flagged.any()):
        answer.copy_(torch.where(flagged, predicted.to(answer.device), answer))
        return confidence, 1
    changed, filled, forwards = fill_left_to_right(denoiser, canvas, flagged, log_probs if with_ == "both" else None,
                                                   doubt)
    return torch.where(changed, filled, confidence), 1 + forwards


@torch.no_grad()
def polish_canvas(denoiser, canvas, passes: int, *, cache=None, editable=None, keep: float = POLISH_KEEP,
                  with_: str = POLISH_WITH, doubt: float = POLISH_DOUBT, steps=None, on_step=None,
                  first_iteration: int = 0, nfe: int = 0) -> int:
    """Up to `passes` noiseless passes over `canvas.answer`, in place; returns the forwards spent. `editable`
    (bool [B, N], default all): the slots a pass may change. `keep`: a slot whose current token the denoiser gives
    at least this probability keeps it (1: every slot takes the filler's greedy token). `with_`: who fills a
    flagged slot; `doubt` < 1: the parent must also give its token less than this (module docstring). Stops early
    once a pass changes nothing."""
    check_values(polish=passes, polish_keep=keep, polish_with=with_, polish_doubt=doubt)
    editable = torch.ones_like(canvas.answer, dtype=torch.bool) if editable is None else editable
    spent = 0
    for i in range(passes):
        before = canvas.answer.clone()
        confidence, forwards = polish_pass(denoiser, canvas, cache, editable, keep, with_, doubt)
        spent += forwards
        after = canvas.answer.clone()
        record_step(steps, on_step, first_iteration + i, before, after, confidence, denoiser.mask_id, nfe + spent)
        if bool((after == before).all()):
            break
    return spent


def draft_canvas(denoiser, tokenizer, prompts: list[str], drafts, chat_template):
    """(a canvas holding `drafts` [B, N] as the answers to `prompts`, the prompt's K/V cache or None): read as
    the run's samplers read a canvas, in its trained blocks for a block-causal run, with the prompt's cache
    where that is exact."""
    device = next(denoiser.parameters()).device
    canvas = build_canvas(tokenizer, prompts, drafts.shape[1], denoiser.mask_id, chat_template=chat_template,
                          device=device)
    canvas.answer.copy_(drafts.to(device))
    decode_blocks(denoiser, canvas, None)
    return canvas, sampler_cache(denoiser, canvas, None)


def end_token(tokenizer, denoiser) -> int:
    """The token a finished answer ends with (the tokenizer's EOS, the chat turn's end for chat models)."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    ids = eos_token_ids(tokenizer, denoiser)
    if not ids:
        raise ValueError("polish needs an end-of-answer token: the tokenizer and the model name none")
    return min(ids)


@torch.no_grad()
def polish(denoiser, tokenizer, generations: list[Generation], passes: int, *, max_new_tokens: int,
           chat_template: bool | str = True, keep: float = POLISH_KEEP, with_: str = POLISH_WITH,
           doubt: float = POLISH_DOUBT, on_step=None, trace: bool = False) -> list[Generation]:
    """`generations` (one batch, in prompt order) after up to `passes` noiseless passes: same prompts, the text
    the passes left, `nfe` counting their forwards, the passes' steps appended to the trace (iterations numbered
    on from the draft's). An answer longer than `max_new_tokens` (an AR draft) is cut to it first."""
    check_values(polish=passes, polish_keep=keep, polish_with=with_, polish_doubt=doubt)  # before the canvas
    if passes == 0 or not generations:
        return generations
    check_filler(denoiser.info, with_, "this run")
    started = time.perf_counter()
    denoiser.eval()
    end = end_token(tokenizer, denoiser)
    drafts = torch.tensor([(g.token_ids + [end] * max_new_tokens)[:max_new_tokens] for g in generations])
    canvas, cache = draft_canvas(denoiser, tokenizer, [g.prompt for g in generations], drafts, chat_template)
    # the passes are numbered on from the draft's steps (its forwards when it kept no trace)
    done = max((g.steps[-1].iteration + 1 if g.steps else g.nfe for g in generations), default=0)
    steps = [[] for _ in generations] if trace else None
    draft_nfe = generations[0].nfe
    spent = polish_canvas(denoiser, canvas, passes, cache=cache, keep=keep, with_=with_, doubt=doubt, steps=steps,
                          on_step=on_step, first_iteration=done, nfe=draft_nfe)
    eos = eos_token_ids(tokenizer, denoiser)
    seconds = time.perf_counter() - started
    out = []
    for row, gen in enumerate(generations):
        answer = canvas.answer[row].tolist()
        cut = next((i for i, t in enumerate(answer) if t in eos), len(answer))
        ids = answer[:cut]
        out.append(replace(gen, text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                           nfe=gen.nfe + spent, seconds=gen.seconds + seconds,
                           steps=gen.steps + (steps[row] if steps is not None else []),
                           polish_forwards=spent))
    return out
