"""`noise.suffix_share`: rows masked from a cut to the end of the answer (the parent's left-to-right order)."""

import torch

from lad.noise import NoiseConfig, corrupt

PAD, MASK = 0, 3


def batch(rows: list[tuple[int, int]], width: int):
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    answer = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, :p + a] = 1000 + torch.arange(p + a)
        answer[i, p:p + a] = True
    return ids, answer


def corrupt_rows(cfg, rows, width, levels, seed=0):
    ids, answer = batch(rows, width)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(rows))]
    return ids, answer, corrupt(ids, answer, torch.tensor(levels), cfg, MASK, gens)


def test_suffix_rows_mask_exactly_the_answer_tokens_after_the_cut():
    cfg = NoiseConfig(objective="mixed", suffix_share=1.0)
    rows = [(3, 10), (0, 7), (5, 1), (2, 20)]
    levels = [0.3, 0.99, 0.001, 0.5]
    ids, answer, c = corrupt_rows(cfg, rows, 32, levels)
    assert c.suffix.all()
    for i, ((p, n), t) in enumerate(zip(rows, levels)):
        m = min(n, max(1, round(t * n)))
        cut = p + n - m
        expected = ids[i].clone()
        expected[cut:p + n] = MASK
        assert torch.equal(c.noisy_ids[i], expected)  # prompt, the answer before the cut and padding untouched
        assert c.loss_mask[i].nonzero().flatten().tolist() == list(range(cut, p + n))
        assert torch.allclose(c.weights[i][c.loss_mask[i]], torch.full((m,), 1.0 / m))
        assert c.weights[i][~c.loss_mask[i]].eq(0).all()
        assert not c.structural[i]


def test_suffix_share_is_the_share_of_rows_whatever_the_objective():
    for objective in ("mask", "structural", "mixed"):
        cfg = NoiseConfig(objective=objective, suffix_share=0.3)
        _, _, c = corrupt_rows(cfg, [(2, 12)] * 2000, 16, [0.5] * 2000)
        assert abs(c.suffix.float().mean().item() - 0.3) < 0.04, objective
        assert not (c.suffix & c.structural).any()


def test_no_suffix_share_keeps_the_random_streams():
    """suffix_share 0 draws nothing extra: earlier runs' noise is reproduced exactly."""
    rows, levels = [(2, 12)] * 8, [0.1 * (i + 1) for i in range(8)]
    _, _, a = corrupt_rows(NoiseConfig(objective="mixed"), rows, 16, levels)
    _, _, b = corrupt_rows(NoiseConfig(objective="mixed", suffix_share=0.0), rows, 16, levels)
    assert torch.equal(a.noisy_ids, b.noisy_ids) and torch.equal(a.weights, b.weights)
    assert not a.suffix.any()


def test_suffix_share_is_validated():
    import pytest

    with pytest.raises(ValueError, match="suffix_share"):
        NoiseConfig(suffix_share=1.5).validate()
