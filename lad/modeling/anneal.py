"""Attention annealing (DiffuLLaMA): from causal to bidirectional attention over the first N training steps.

At progress p in [0, 1] each query may attend to every earlier token (as the AR parent did) and to each later
token with probability p, drawn independently per (query, key) pair; padding is never attended to. At p = 0
this is the parent's causal mask, at p = 1 the full bidirectional one, so the model meets bidirectional
context gradually instead of all at once. Each row draws from its own generator, so a row's mask does not
depend on how rows are split into micro-batches or processes. Once annealing ends, training goes back to
transformers' own bidirectional path (a 2-D padding mask, fast kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .windows import additive


def anneal_progress(step: int, anneal_steps: int) -> float:
    """Share of later tokens visible at `step`: step / anneal_steps, 1.0 once annealing is over (or off)."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def annealed_allowed(attention_mask: Tensor, progress: float, generators: list[torch.Generator]) -> Tensor:
    """Bool [B, L, L] on the mask's device: may query q attend to key k at this progress."""
    batch, length = attention_mask.shape
    if len(generators) != batch:
        raise ValueError(f"generators: got {len(generators)} for a batch of {batch}")
    earlier = torch.ones(length, length, dtype=torch.bool).tril()
    future = torch.stack([torch.rand(length, length, generator=g) < progress for g in generators])
    allowed = (earlier | future) & attention_mask.bool().cpu()[:, None, :]
    return allowed.to(attention_mask.device)


def annealed_mask(attention_mask: Tensor, progress: float, generators: list[torch.Generator],
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive 4-D mask [B, 1, L, L] (0 = may attend, dtype's min = may not), which transformers uses as is."""
    return additive(annealed_allowed(attention_mask, progress, generators), dtype)
