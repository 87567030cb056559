"""Single-token continuations (MMLU's " A"/" B"/" C"/" D"): one forward per distinct context.

The choices of such a question share their whole input — the context plus one masked slot for the denoiser,
the context alone for the causal parent — so one forward gives the distribution every choice is read from.
Scoring them one by one would spend the same forward four times. Exact in every mode: with one token there is
no order to choose and nothing to sample.
"""

from __future__ import annotations

import torch

from ..modeling.attention import answer_start_at
from .batching import count, device_of, pad_batch, pad_id_of


@torch.no_grad()
def score_single_tokens(denoiser, requests, *, causal: bool = False, batch_size: int = 16, progress=None,
                        stats: dict | None = None) -> list[tuple[float, bool]]:
    """(log p(token | context), is_greedy) for requests whose continuation is one token, in request order."""
    denoiser.eval()
    device, pad_id = device_of(denoiser), pad_id_of(denoiser)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        if len(continuation) != 1:
            raise ValueError(f"request {i}: score_single_tokens needs a one-token continuation")
        by_context.setdefault(tuple(context), []).append(i)
    contexts = sorted(by_context, key=len, reverse=True)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        if causal:  # the parent: the last context position predicts the next token (left padding keeps it last)
            ids, attention = pad_batch(chunk, pad_id, side="left", device=device)
            logits = denoiser.parent_logits(ids, attention)[:, -1]
        else:  # the denoiser: context + one masked slot, read at the slot
            ids, attention = pad_batch([list(c) + [denoiser.mask_id] for c in chunk], pad_id, side="left",
                                       device=device)
            positions = torch.zeros_like(ids, dtype=torch.bool)
            positions[:, -1] = True
            logits = denoiser(ids, attention, positions=positions,
                              answer_start=answer_start_at(ids.shape[1] - 1, len(chunk), device))
        log_probs = logits.float().log_softmax(-1)
        count(stats, rows=len(chunk))
        for row, context in enumerate(chunk):
            best = int(log_probs[row].argmax())
            for i in by_context[context]:
                token = requests[i][1][0]
                results[i] = (float(log_probs[row, token]), best == token)
        if progress is not None:
            progress(sum(len(by_context[c]) for c in chunk))
    return results
