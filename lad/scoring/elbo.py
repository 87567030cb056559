"""`score_elbo`: LLaDA's Monte-Carlo lower bound on the log-likelihood of a continuation.

For one request (context c, continuation x of L tokens) and M = mc_samples:

    g = Generator(seed, group)                   # the choices of one question share their draws
    u = rand(g)                                  # one offset per request: stratified number of masks
    keys = rand(L, M, g).T                       # a random key per (sample, position)
    for k in 0..M-1:
        l_k = 1 + floor((k + u) / M * L)         # in {1..L}; stratified: each value about M/L times
        m_k = the l_k positions with the smallest keys   # l_k positions uniformly at random
        loss_k = Σ_{j in m_k} -log p(x_j | c, x with m_k masked) * L / l_k
    log-likelihood ≈ -mean_k loss_k

(LLaDA, "Large Language Diffusion Models", Eq. 6 with a stratified l; its eval uses M = 128.) Each loss_k is an
unbiased estimate of the negative ELBO, so the estimate is a lower bound in expectation. A single-token
continuation has nothing to sample: log p(x_0 | c, [MASK]) is exact, in one forward.

Shared draws: the generator is seeded from (seed, group id), so requests in one group see the same u and the
same keys. `keys` is drawn position-major, so position j gets the same keys whatever L is: choices of different
lengths still share every draw they can. Without group ids every request is its own group (its index).

is_greedy: one extra forward with the whole continuation masked; True when the argmax equals the true token at
every slot (for L = 1 that forward is the scoring one). NFE per request: M + 1 for L > 1, 1 for L = 1.

`prefix_cache` (on by default for prompt-causal runs, where it is exact): each distinct context runs once for the
whole call (the requests are ordered so that a question's rows are consecutive, and its keys and values are kept
across the batches they span: `KeptContexts`, lad/modeling/cache.py), and the M + 1 sequences of a request run only
their continuation columns against those keys and values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..modeling.cache import KeptContexts
from .batching import (check_batch_size, check_requests, context_batch, context_order, count, device_of,
                       longest_first, pad_id_of, use_prefix_cache)


def group_generator(seed: int, group: int) -> torch.Generator:
    """A CPU generator seeded from (seed, group): draws do not depend on the device or on batching.

    torch's CPU generator keeps only the low 32 bits of a seed, so the pair is mixed into 32 bits: under one
    seed, distinct groups (< 2**32) always get distinct seeds."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(group)) % (1 << 32))


def elbo_masks(length: int, mc_samples: int, generator: torch.Generator) -> Tensor:
    """Bool [mc_samples, length]: row k masks l_k = 1 + floor((k + u) / M * L) positions chosen uniformly."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    k = torch.arange(mc_samples, dtype=torch.float64)
    n_masked = (1 + torch.floor((k + u) / mc_samples * length)).long().clamp(1, length)
    keys = torch.rand(length, mc_samples, generator=generator).T  # position-major: shared across lengths
    rank = keys.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
    return rank < n_masked[:, None]


@torch.no_grad()
def score_elbo(denoiser, requests, *, mc_samples: int = 128, seed: int = 0, batch_size: int = 16,
               group_ids=None, prefix_cache: bool | None = None, progress=None,
               stats: dict | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood estimate, is_greedy) per request, in request order. Deterministic for a seed.

    batch_size: sequences per forward (each Monte-Carlo sample is one sequence; samples of several requests
    share a forward). progress(n): called with the number of requests just finished. stats: if given,
    stats["nfe"] += sequences run through the model, stats["forward_calls"] += batched forwards.
    """
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    batch_size = check_batch_size(batch_size)
    requests = check_requests(requests, need_context=denoiser.shift)
    if group_ids is None:
        group_ids = list(range(len(requests)))
    if len(group_ids) != len(requests):
        raise ValueError(f"group_ids has {len(group_ids)} entries for {len(requests)} requests")
    cached = use_prefix_cache(denoiser, prefix_cache)
    denoiser.eval()
    device, pad_id, mask_id = device_of(denoiser), pad_id_of(denoiser), denoiser.mask_id
    lengths = [len(x) for _, x in requests]

    def units_of(i: int):
        """Masks of request i: the M samples, then the all-masked greedy check (the only one when L = 1)."""
        everything = torch.ones(1, lengths[i], dtype=torch.bool)
        if lengths[i] == 1:
            return everything
        return torch.cat([elbo_masks(lengths[i], int(mc_samples), group_generator(seed, group_ids[i])), everything])

    if cached:  # a context's rows consecutive, so that it runs once for all the batches they span
        order, kept = context_order(requests), KeptContexts()
    else:
        order, kept = longest_first([len(c) + len(x) for c, x in requests]), None
    loss = [0.0] * len(requests)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    pending: list[tuple[int, Tensor, bool]] = []  # (request, mask over its continuation, is the greedy check)

    def run(units: list[tuple[int, Tensor, bool]]) -> None:
        batch = context_batch(denoiser, [requests[i] for i, _, _ in units], pad_id, device, cached, stats,
                              kept)
        target, start = batch.ids, batch.context_width
        masked = torch.zeros_like(target, dtype=torch.bool)
        for row, (i, mask, _) in enumerate(units):
            masked[row, start:start + lengths[i]] = mask.to(device)
        log_probs = denoiser(target.masked_fill(masked, mask_id), batch.attention_mask, positions=masked,
                             cache=batch.cache, answer_start=batch.answer_start).float()
        log_probs = log_probs.log_softmax(-1)
        count(stats, rows=len(units))
        true_lp = torch.zeros(masked.shape, dtype=torch.float32, device=device)
        true_lp[masked] = log_probs.gather(-1, target[masked].unsqueeze(-1)).squeeze(-1)
        wrong = torch.zeros_like(masked)
        wrong[masked] = log_probs.argmax(-1) != target[masked]
        sums, wrong = true_lp.sum(-1).double().tolist(), wrong.any(-1).tolist()
        done = 0
        for row, (i, mask, is_check) in enumerate(units):
            if not is_check:
                loss[i] -= sums[row] * lengths[i] / int(mask.sum())
                continue
            # the check is a request's last unit
            value = sums[row] if lengths[i] == 1 else -loss[i] / int(mc_samples)
            results[i] = (value, not wrong[row])
            done += 1
        if progress is not None and done:
            progress(done)

    for i in order:
        masks = units_of(i)
        pending += [(i, mask, k == len(masks) - 1) for k, mask in enumerate(masks)]
        while len(pending) >= batch_size:
            run(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        run(pending)
    return results
