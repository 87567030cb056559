"""`score_ar`: the AR parent's log-likelihood (adapter off, causal attention), exactly as lm-eval's `hf` model.

For one request (context c, continuation x of L tokens):

    inp = (c + x)[:-1]                           # the last token is never an input
    logits = parent(inp)                         # causal: index i predicts token i + 1
    rows = logits[-L:]                           # the predictions of x_0 .. x_{L-1}
    log-likelihood = Σ_j log_softmax(rows)[j, x_j]
    is_greedy = all(argmax(rows) == x)

This is the fair side-by-side for the denoiser: same weights without the adapter, same prompts, same token split.
Requests are left-padded (position ids start at each row's first real token, so padding changes nothing), and
the LM head runs only at the last K positions, where every row's continuation is predicted; one forward per chunk.
"""

from __future__ import annotations

import torch

from .batching import check_requests, count, device_of, length_chunks, pad_batch, pad_id_of


@torch.no_grad()
def score_ar(denoiser, requests, *, batch_size: int = 16, progress=None,
             stats: dict | None = None, per_token: list | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per request, in request order, from `denoiser.parent_logits`.

    progress(n): called after each chunk with the number of requests it finished. stats: if given,
    stats["nfe"] += sequences run (one per request), stats["forward_calls"] += batched forwards.
    per_token: if given (a list), filled with each request's token log-probabilities, in request order.
    """
    requests = check_requests(requests, need_context=True)
    denoiser.eval()
    device, pad_id = device_of(denoiser), pad_id_of(denoiser)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    tokens: list[list[float] | None] = [None] * len(requests)
    for chunk in length_chunks([len(c) + len(x) for c, x in requests], batch_size):
        inputs = [(requests[i][0] + requests[i][1])[:-1] for i in chunk]
        ids, attention = pad_batch(inputs, pad_id, side="left", device=device)
        keep = max(len(requests[i][1]) for i in chunk)  # left padding: every continuation is read at the end
        log_probs = denoiser.parent_logits(ids, attention, keep_last=keep).float().log_softmax(-1)  # [B, keep, V]
        count(stats, rows=len(chunk))
        for row, i in enumerate(chunk):
            continuation = requests[i][1]
            rows = log_probs[row, keep - len(continuation):]
            truth = torch.tensor(continuation, device=device)
            terms = rows.gather(-1, truth[:, None])[:, 0]
            results[i] = (float(terms.sum()), bool((rows.argmax(-1) == truth).all()))
            if per_token is not None:
                tokens[i] = terms.tolist()
        if progress is not None:
            progress(len(chunk))
    if per_token is not None:
        per_token[:] = tokens
    return results
