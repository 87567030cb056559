"""Sliding-window attention in the 4-D masks LAD builds itself (prompt-causal attention, annealing).

transformers applies a model's sliding window when it builds a mask from a 2-D padding mask, but uses a 4-D mask
it is given as is, for every layer. Mistral slides every layer by `sliding_window`; Qwen2/Qwen3 slide the layers
that `layer_types` marks "sliding_attention". So every 4-D mask LAD builds goes through `decoder_mask`, which
cuts each layer type's window the way transformers' own masks cut it:

    a query that reads causally (the prompt, under prompt-causal attention)   sees keys with  q - w < k <= q
    a query that reads bidirectionally (an answer slot, an annealed query)    sees keys with  |q - k| <= w

(transformers' causal and bidirectional sliding rules). A cached forward, whose masks transformers builds from
the padding mask, and a full forward with LAD's mask then agree, and the prompt reads exactly as the parent read
it. LLaMA has no window: the mask is returned as it was, one tensor for every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def layer_windows(config) -> dict[str, int | None]:
    """{layer type: its sliding window, None for full attention}; one entry when every layer is alike."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:  # Mistral (every layer slides when sliding_window is set) or LLaMA (none does)
        return {"full_attention": window}
    return {kind: (window if kind == "sliding_attention" else None) for kind in dict.fromkeys(types)}


def window_band(length: int, bidirectional_rows: Tensor, window: int, position_ids: Tensor | None = None) -> Tensor:
    """Bool [B, L, L]: the keys within `window` of each query (bidirectional_rows: bool [B, L], per query), by
    column distance, or by position distance when `position_ids` [B, L] are given (the training layout of
    block-causal runs holds copies of the answer at the same positions: lad/training/blocks.py)."""
    index = torch.arange(length, device=bidirectional_rows.device)
    where = index[None, :] if position_ids is None else position_ids.to(bidirectional_rows.device)
    distance = where[:, :, None] - where[:, None, :]  # [B, q, k]: q - k
    causal = distance < window  # keys after q are cut by the causal part of the mask itself
    both = distance.abs() <= window
    return torch.where(bidirectional_rows[:, :, None], both, causal)


def decoder_mask(allowed: Tensor, bidirectional_rows: Tensor, config, dtype: torch.dtype,
                 position_ids: Tensor | None = None) -> Tensor | dict:
    """The additive 4-D mask(s) for the decoder from `allowed` (bool [B, L, L]): one tensor when every layer has
    the same window, else {layer type: mask}, which Qwen2/Qwen3 take per layer."""
    masks = {}
    for kind, window in layer_windows(config).items():
        cut = allowed if window is None else \
            allowed & window_band(allowed.shape[-1], bidirectional_rows, window, position_ids)
        masks[kind] = additive(cut, dtype)
    return next(iter(masks.values())) if len(masks) == 1 else masks


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive 4-D mask [B, 1, L, L] from a bool [B, L, L] (0 = may attend, dtype's min = may not), the form
    transformers uses as is. Fully masked rows (a padding query) get a uniform, finite softmax, never NaN."""
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
