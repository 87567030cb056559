"""Batch Examples into padded tensors, and a resumable shuffled batch order."""

from __future__ import annotations

import torch

from .formats import Example


def collate(
    examples: list[Example],
    pad_id: int,
    *,
    pad_to_multiple_of: int = 8,
    padding_side: str = "right",
    shift: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad prompt+answer sequences to one length L (the longest, rounded up to `pad_to_multiple_of`).

    Returns input_ids, attention_mask (1 on real tokens), answer_mask (bool, answer tokens: the only ones the
    diffusion loss corrupts and scores) and position_ids (0.. over the real tokens, so left padding does not
    shift positions; 0 on pads). With `shift=True` (Dream/DiffuLLaMA: token i is predicted at position i-1) a
    row's first real token has no position to be predicted from, so it is removed from answer_mask.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in examples]
    width = max(lengths)
    if pad_to_multiple_of and pad_to_multiple_of > 1:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    answer_mask = torch.zeros((batch, width), dtype=torch.bool)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    for row, (example, n) in enumerate(zip(examples, lengths)):
        start = 0 if padding_side == "right" else width - n
        real = slice(start, start + n)
        input_ids[row, real] = torch.tensor(example.prompt_ids + example.answer_ids, dtype=torch.long)
        attention_mask[row, real] = 1
        position_ids[row, real] = torch.arange(n)
        answer_mask[row, start + len(example.prompt_ids) : start + n] = True
        if shift and n:
            answer_mask[row, start] = False
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "position_ids": position_ids,
    }


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """Shuffled batches of range(n) for one epoch, a pure function of (seed, epoch).

    A resumed run recomputes the same order and skips to its batch index, with no loader state to save.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
