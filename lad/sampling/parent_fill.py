"""The AR parent fills a polish pass's flagged slots left to right, reading the answer as repaired so far.

A polish pass's denoiser flags the slots whose token it doubts (lad/sampling/polish.py). Filled all at once, a
flagged slot would take the parent's token given the draft before it, wrong tokens included, so a repair could
follow a mistake it should have read past. Here the parent reads the answer left to right instead, as it reads
its own text: at the first flagged slot (in each row) whose filler's greedy token differs from the draft's, that
token goes in, and the parent reads on from there with the repaired token; the slots before it are decided. It is
speculative verification's shape (lad/sampling/verify.py) with the denoiser's flags as the check: the parent's
K/V cache keeps every decided column (`Denoiser.parent_reader`), and each forward reads the next `WINDOW` slots
after the first undecided one, so a pass costs (slots changed + windows) parent forwards of at most `WINDOW`
columns in a batch of one.

`doubt` < 1 asks the parent to agree before a slot changes: a flagged slot keeps its token when the parent gives
it at least `doubt` given the repaired text before it (the denoiser reads the right context, the parent the left;
a token both doubt is the one to change).
"""

from __future__ import annotations

import torch
from torch import Tensor

WINDOW = 16  # slots per parent forward: a few more columns cost little (docs/results.md, "The price of a forward")


@torch.no_grad()
def fill_left_to_right(denoiser, canvas, flagged: Tensor, denoiser_log_probs: Tensor | None, doubt: float = 1.0,
                       window: int = WINDOW) -> tuple[Tensor, Tensor, int]:
    """Change `flagged` slots (bool [B, N]) of `canvas.answer` in place, left to right: each takes the greedy
    token of the parent given the answer before it as it now stands (`denoiser_log_probs` [B, N, V] given: of the
    product of the two distributions). Returns (changed [B, N], the filler's confidence [B, N], parent forwards)."""
    rows, width = canvas.answer.shape
    device = canvas.ids.device
    flagged = flagged.to(device)
    changed = torch.zeros(rows, width, dtype=torch.bool, device=device)
    confidence = torch.zeros(rows, width, device=device)
    cursor = torch.zeros(rows, dtype=torch.long, device=device)  # per row: the slots before it are decided
    done, forwards = 0, 0
    with denoiser.parent_reader(canvas) as read:
        while done < width:
            end = min(width, done + window)
            log_probs = read(done, end).to(device)
            forwards += 1
            current = canvas.answer[:, done:end]
            ask = flagged[:, done:end]
            if doubt < 1:
                ask = ask & (log_probs.gather(-1, current.unsqueeze(-1)).squeeze(-1).exp() < doubt)
            if denoiser_log_probs is not None:
                log_probs = (log_probs + denoiser_log_probs[:, done:end].to(device)).log_softmax(-1)
            best, tokens = log_probs.exp().max(-1)
            slots = torch.arange(done, end, device=device)
            change = ask & (tokens != current) & (slots[None] >= cursor[:, None])
            at = torch.where(change, slots[None], end).min(-1).values  # each row's first change, or end
            for row in torch.nonzero(at < end).flatten().tolist():
                slot = int(at[row])
                canvas.answer[row, slot] = tokens[row, slot - done]
                changed[row, slot], confidence[row, slot] = True, best[row, slot - done]
            cursor = torch.where(at < end, at + 1, torch.full_like(at, end))
            done = int(cursor.min())
    return changed, confidence, forwards
