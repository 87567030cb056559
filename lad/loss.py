"""Weighted cross-entropy on the supervised positions of a corrupted batch.

`noise.corrupt` gives each supervised position a weight (1/(t·n_answer) for masked tokens of the `mask`
objective, 1/n_answer for every answer token of `structural`). The loss of a batch is the weighted sum
divided by the number of examples it stands for, so micro-batches, accumulation and processes add up to
the same objective (see `finetune.train_step`).

Parent distillation (`distill_weight`) adds a KL term toward the causal AR parent's next-token distribution at
the positions where that distribution is a valid soft target (`distill_positions`).
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
    kl_sum: float = 0.0  # weighted KL(parent || denoiser) summed over examples (distillation only)
    kl_tokens: int = 0  # positions the KL was computed at
    prompt_kl_sum: float = 0.0  # KL(parent || denoiser) at the prompt's predictions, mean per row, summed over rows
    prompt_kl_tokens: int = 0
    input_tokens: int = 0  # tokens read (attention mask), for throughput

    def add(self, other: "LossStats") -> None:
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def summary(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss_sum / max(self.examples, 1),
               f"{prefix}acc": self.correct / max(self.tokens, 1)}
        if self.masked:
            out[f"{prefix}masked_acc"] = self.masked_correct / self.masked
        if self.masked and self.tokens > self.masked:  # structural rows: supervised tokens the input showed (kept
            # or wrong): how often the model keeps a right token or repairs a wrong one, the skill --polish needs
            out[f"{prefix}unmasked_acc"] = (self.correct - self.masked_correct) / (self.tokens - self.masked)
        if self.kl_tokens:
            out[f"{prefix}kl"] = self.kl_sum / max(self.examples, 1)
        if self.prompt_kl_tokens:
            out[f"{prefix}prompt_kl"] = self.prompt_kl_sum / max(self.examples, 1)
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


def distill_positions(noisy_ids: Tensor, answer_mask: Tensor, mask_id: int, structural: Tensor) -> Tensor:
    """Bool [B, L]: masked answer positions of non-structural rows after which every answer token is masked.

    There the denoiser sees only the prompt and (some of) the answer tokens before i, a subset of what the
    parent conditions on (x_<i), so the parent's p(x_i | x_<i) averages to the denoiser's Bayes target: a
    lower-variance stand-in for the one-hot target (Rao-Blackwell). Where a later token is visible, or in
    structural rows (a span shift can move later tokens earlier), the denoiser knows more than the parent and
    the parent's distribution would be the wrong target. Not covered: the denoiser also knows the answer
    length from the canvas, a bias that matters near the end of the answer. Suffix rows qualify entirely.
    """
    answer = answer_mask.bool()
    masked = (noisy_ids == mask_id) & answer & ~structural.bool()[:, None]
    visible = (answer & (noisy_ids != mask_id)).long()
    visible_after = visible.flip(-1).cumsum(-1).flip(-1) - visible  # visible answer tokens at j > i
    return masked & (visible_after == 0)


def prompt_positions(attention_mask: Tensor, answer_mask: Tensor) -> Tensor:
    """Bool [B, L]: the tokens predicted from a prompt column under the shift (token i from column i-1): the
    prompt's tokens after its first, and the first answer token. Where the prompt is read causally
    (`attention: prompt_causal`) such a column sees only the prompt up to itself, exactly what the AR parent
    conditions on, so the parent's distribution there is the exact target, whatever the answer's noise."""
    real = attention_mask.bool()
    prompt_column = real & ~answer_mask.bool()
    out = torch.zeros_like(real)
    out[:, 1:] = prompt_column[:, :-1] & real[:, 1:]
    return out


def per_row_mean_weights(where: Tensor) -> Tensor:
    """Float [B, L]: 1 / (the row's count) at `where`, 0 elsewhere, so each row's weighted sum is its mean."""
    counts = where.sum(-1, keepdim=True).clamp(min=1)
    return where.float() / counts


KL_CHUNK = 256  # positions per chunk: a [256, V] fp32 block at a time instead of several [N, V] copies


def kl_to_parent(logits: Tensor, parent_logits: Tensor, weights: Tensor, chunk: int = KL_CHUNK) -> Tensor:
    """Sum of weight·KL(parent || denoiser) over N positions ([N, V] each; computed in fp32).

    Computed `chunk` positions at a time with a hand-written backward, d/dq = w·(softmax(q) - p): autograd's
    version keeps log-softmaxes, exponentials and products of [N, V] for the backward, several copies of the
    logits (at N≈1000 and SmolLM2's 49k vocabulary, about 1 GB); this keeps none."""
    return _ChunkedParentKL.apply(logits, parent_logits.detach(), weights.detach(), chunk)


class _ChunkedParentKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, parent_logits, weights, chunk):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            end = start + chunk
            log_q = F.log_softmax(logits[start:end].to(dtype), -1)
            log_p = F.log_softmax(parent_logits[start:end].to(dtype), -1)
            p = log_p.exp()
            terms = torch.where(p > 0, p * (log_p - log_q), 0.0)  # 0·log 0 = 0 (the masked-out mask token)
            total += (terms.sum(-1) * weights[start:end].to(dtype)).sum()
        ctx.save_for_backward(logits, parent_logits, weights)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, parent_logits, weights = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            end = start + ctx.chunk
            q = F.softmax(logits[start:end].to(ctx.dtype), -1)
            p = F.softmax(parent_logits[start:end].to(ctx.dtype), -1)
            out[start:end] = ((q - p) * (weights[start:end].to(ctx.dtype) * grad)[:, None]).to(out.dtype)
        return out, None, None, None
