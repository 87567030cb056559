"""Weighted cross-entropy and the loss/accuracy statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lad.loss import LossStats, position_stats, weighted_cross_entropy


def hand_ce(row: list[float], target: int) -> float:
    top = max(row)
    return -(row[target] - top - math.log(sum(math.exp(x - top) for x in row)))


def test_weighted_cross_entropy_equals_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0],
                           [0.1, 0.2, 0.3, 0.4],
                           [-3.0, 5.0, 1.0, 1.0]])
    targets = torch.tensor([0, 3, 2])
    weights = torch.tensor([0.5, 2.0, 0.25])
    expected = sum(w * hand_ce(row, t) for row, t, w in zip(logits.tolist(), targets.tolist(), weights.tolist()))
    got = weighted_cross_entropy(logits, targets, weights)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a hand value written out: CE of a uniform 4-way row is log 4
    uniform = weighted_cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3]), torch.tensor([1.0, 3.0]))
    assert uniform.item() == pytest.approx(4 * math.log(4), rel=1e-6)


def test_weighted_cross_entropy_is_a_sum_not_a_mean():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 4])
    ones = weighted_cross_entropy(logits, targets, torch.ones(5))
    assert ones.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item() * 5, rel=1e-6)
    zero = weighted_cross_entropy(logits, targets, torch.zeros(5))
    assert zero.item() == 0.0
    assert weighted_cross_entropy(logits[:0], targets[:0], torch.ones(0)).item() == 0.0


def test_weighted_cross_entropy_computes_in_fp32_and_keeps_gradients():
    logits = torch.tensor([[30.0, -30.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([1, 0])
    weights = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    loss = weighted_cross_entropy(logits, targets, weights)
    assert loss.dtype == torch.float32
    expected = hand_ce([30.0, -30.0, 0.0], 1) + 0.5 * hand_ce([1.0, 2.0, 3.0], 0)
    assert loss.item() == pytest.approx(expected, rel=1e-3)
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    # d(CE)/d(logit of the target) = p(target) - 1, scaled by the weight
    probs = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert logits.grad[1, 0].float().item() == pytest.approx(0.5 * (probs[0].item() - 1), abs=1e-2)


def test_loss_stats_summary():
    stats = LossStats(loss_sum=6.0, examples=4, tokens=10, correct=7, masked=4, masked_correct=1)
    assert stats.summary() == {"loss": 1.5, "acc": 0.7, "masked_acc": 0.25, "unmasked_acc": 1.0}
    assert stats.summary("val_") == {"val_loss": 1.5, "val_acc": 0.7, "val_masked_acc": 0.25, "val_unmasked_acc": 1.0}
    only_masked = LossStats(loss_sum=6.0, examples=4, tokens=4, correct=1, masked=4, masked_correct=1)
    assert "unmasked_acc" not in only_masked.summary()  # the mask objective supervises masked slots only


def test_loss_stats_summary_without_masked_positions_or_examples():
    assert LossStats(loss_sum=3.0, examples=2, tokens=4, correct=4).summary() == {"loss": 1.5, "acc": 1.0}
    assert LossStats().summary("val_") == {"val_loss": 0.0, "val_acc": 0.0}


def test_loss_stats_add():
    total = LossStats()
    total.add(LossStats(loss_sum=1.0, examples=2, tokens=5, correct=3, masked=2, masked_correct=1))
    total.add(LossStats(loss_sum=2.5, examples=3, tokens=7, correct=1, masked=4, masked_correct=0))
    assert total == LossStats(loss_sum=3.5, examples=5, tokens=12, correct=4, masked=6, masked_correct=1)
    assert total.summary() == {"loss": 0.7, "acc": 4 / 12, "masked_acc": 1 / 6, "unmasked_acc": 3 / 6}


def test_position_stats_counts():
    logits = torch.tensor([[5.0, 0.0, 0.0],  # argmax 0
                           [0.0, 5.0, 0.0],  # argmax 1
                           [0.0, 0.0, 5.0],  # argmax 2
                           [5.0, 0.0, 0.0]])  # argmax 0
    targets = torch.tensor([0, 2, 2, 1])  # hits: yes, no, yes, no
    was_masked = torch.tensor([True, True, False, False])
    stats = position_stats(logits, targets, was_masked, torch.tensor(4.5), examples=3)
    assert stats == LossStats(loss_sum=4.5, examples=3, tokens=4, correct=2, masked=2, masked_correct=1)
    assert isinstance(stats.loss_sum, float) and isinstance(stats.correct, int)
