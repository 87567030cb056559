"""Weighted cross-entropy on the supervised positions of a corrupted batch.

`noise.corrupt` gives each supervised position a weight (1/(t·n_answer) for masked tokens of the `mask`
objective, 1/n_answer for every answer token of `structural`). The loss of a batch is the weighted sum
divided by the number of examples it stands for, so micro-batches, accumulation and processes add up to
the same objective (see `finetune.train_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossStats:
    loss_sum: float = 0.0  # weighted CE summed over examples
    examples: int = 0
    tokens: int = 0  # supervised positions
    correct: int = 0  # argmax == target at supervised positions
    masked: int = 0  # supervised positions whose input was the mask token
    masked_correct: int = 0

    def add(self, other: "LossStats") -> None:
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def summary(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss_sum / max(self.examples, 1),
               f"{prefix}acc": self.correct / max(self.tokens, 1)}
        if self.masked:
            out[f"{prefix}masked_acc"] = self.masked_correct / self.masked
        return out


def weighted_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Sum of weight·CE over the N selected positions (logits [N, V], in fp32 for a stable softmax)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights.to(ce.dtype)).sum()


@torch.no_grad()
def position_stats(logits: Tensor, targets: Tensor, was_masked: Tensor, loss_sum: Tensor, examples: int) -> LossStats:
    hit = logits.argmax(-1) == targets
    return LossStats(loss_sum=float(loss_sum), examples=examples, tokens=int(targets.numel()),
                     correct=int(hit.sum()), masked=int(was_masked.sum()), masked_correct=int((hit & was_masked).sum()))
