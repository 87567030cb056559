import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lad.noise import (Corruption, NoiseConfig, _span_shift, corrupt, sample_levels,
                       validation_levels)

PAD, MASK = 0, 3
PROMPT_BASE, ANSWER_BASE = 1000, 100  # distinct token ranges, so every edit is visible


def batch(rows, total_len):
    """rows: list of (prompt_len, answer_len). Answer tokens are distinct within each row."""
    ids = torch.full((len(rows), total_len), PAD, dtype=torch.long)
    answer = torch.zeros(len(rows), total_len, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, :p] = PROMPT_BASE + torch.arange(p)
        ids[i, p:p + a] = ANSWER_BASE + torch.arange(a)
        answer[i, p:p + a] = True
    return ids, answer


def only(**rates):
    """Structural config with every op off except the given ones."""
    off = dict(objective="structural", full_mask_share=0.0, mask_rate=0.0, replace_rate=0.0,
               swap_rate=0.0, duplicate_rate=0.0, span_shift_rate=0.0)
    return NoiseConfig(**{**off, **rates})


def run(cfg, rows, total_len, t, seed=0, **kw):
    ids, answer = batch(rows, total_len)
    levels = torch.full((len(rows),), float(t))
    c = corrupt(ids, answer, levels, cfg, MASK, torch.Generator().manual_seed(seed), **kw)
    return ids, answer, c


def answers(ids, answer, c):
    """(clean, noisy) answer spans per row."""
    return [(ids[i][answer[i]], c.noisy_ids[i][answer[i]]) for i in range(len(ids))]


def assert_same(a: Corruption, b: Corruption):
    for f in dataclasses.fields(Corruption):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name


# ---- mask schedule -------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.1, 0.3, 0.7, 0.95])
def test_masked_fraction_tracks_t(t):
    ids, answer, c = run(NoiseConfig(objective="mask"), [(5, 100)] * 200, 110, t)
    frac = (c.noisy_ids[answer] == MASK).float().mean().item()  # 20k answer tokens
    assert abs(frac - t) < 0.012
    assert torch.equal(c.loss_mask, c.noisy_ids == MASK)


def test_structural_mask_rate_tracks_mask_rate_times_t():
    ids, answer, c = run(only(mask_rate=0.5), [(5, 100)] * 200, 110, 0.6)
    frac = (c.noisy_ids[answer] == MASK).float().mean().item()
    assert abs(frac - 0.3) < 0.012


def test_mask_weights_exact():
    rows = [(3, 10), (0, 25), (7, 1), (2, 40)]
    ids, answer, c = run(NoiseConfig(objective="mask"), rows, 50, 0.4)
    n = answer.sum(1, keepdim=True).float()
    expected = torch.where(c.loss_mask, 1.0 / (0.4 * n), torch.zeros(()))
    assert torch.allclose(c.weights, expected)
    assert (c.weights[~c.loss_mask] == 0).all()
    assert not c.structural.any()


def test_mask_weights_sum_to_one_in_expectation():
    ids, answer, c = run(NoiseConfig(objective="mask"), [(4, 20)] * 4000, 30, 0.2)
    assert abs(c.weights.sum(1).mean().item() - 1.0) < 0.03


def test_structural_weights_cover_whole_answer():
    rows = [(3, 10), (0, 25), (7, 1), (2, 40)]
    ids, answer, c = run(NoiseConfig(objective="structural"), rows, 50, 0.5)
    n = answer.sum(1, keepdim=True).float()
    assert torch.equal(c.loss_mask, answer)
    assert torch.allclose(c.weights, answer.float() / n)
    assert c.structural.all()


def test_wrong_weight_weighs_shown_wrong_tokens_against_right_ones():
    rows = [(3, 30), (0, 25), (2, 40)]
    cfg = NoiseConfig(objective="structural", draft_share=0.5, replace_rate=0.5, swap_rate=0.3, wrong_weight=4.0)
    ids, answer, c = run(cfg, rows, 50, 0.9)
    n = answer.sum(1, keepdim=True).float()
    wrong = answer & (c.noisy_ids != ids) & (c.noisy_ids != MASK)
    assert wrong.any() and (answer & ~wrong).any()
    assert torch.allclose(c.weights[wrong], (4.0 / n.expand_as(answer))[wrong])
    assert torch.allclose(c.weights[answer & ~wrong], (1.0 / n.expand_as(answer))[answer & ~wrong])
    same = run(dataclasses.replace(cfg, wrong_weight=1.0), rows, 50, 0.9)[2]
    assert torch.equal(same.noisy_ids, c.noisy_ids)  # the weight changes the loss only, never the noise


# ---- what may never change --------------------------------------------------------------

ALL_ON = dict(full_mask_share=0.2, mask_rate=0.5, replace_rate=1.0, swap_rate=1.0,
              duplicate_rate=0.5, span_shift_rate=1.0)


@pytest.mark.parametrize("objective", ["mask", "structural", "mixed"])
def test_prompt_padding_untouched_and_empty_rows_ignored(objective):
    cfg = NoiseConfig(objective=objective, **ALL_ON)
    rows = [(4, 12), (6, 0), (0, 16), (10, 5), (0, 0)]
    ids, answer, c = run(cfg, rows, 20, 0.9)
    assert c.noisy_ids.shape == ids.shape and c.noisy_ids.dtype == torch.long
    assert torch.equal(c.noisy_ids[~answer], ids[~answer])
    assert not (c.loss_mask & ~answer).any()
    for i in (1, 4):  # rows with no answer: no change, no loss
        assert torch.equal(c.noisy_ids[i], ids[i])
        assert not c.loss_mask[i].any() and (c.weights[i] == 0).all()
    assert torch.equal(c.levels, torch.full((5,), 0.9))


# ---- each structural op does what it says -----------------------------------------------


def test_swaps_at_every_position_give_disjoint_pairs():
    ids, answer, c = run(only(swap_rate=1.0), [(2, 7)], 9, 1.0)
    assert c.noisy_ids[0, 2:].tolist() == [101, 100, 103, 102, 105, 104, 106]


def test_swaps_are_adjacent_exchanges():
    ids, answer, c = run(only(swap_rate=0.3), [(3, 30)] * 100, 33, 1.0)
    n_swapped = 0
    for clean, noisy in answers(ids, answer, c):
        assert sorted(noisy.tolist()) == clean.tolist()
        changed = torch.nonzero(noisy != clean).flatten().tolist()
        assert len(changed) % 2 == 0
        for j, k in zip(changed[::2], changed[1::2]):
            assert k == j + 1 and noisy[j] == clean[k] and noisy[k] == clean[j]
        n_swapped += len(changed) // 2
    assert n_swapped > 300  # ~0.3 * 29 * 100 minus skipped overlaps


def test_duplication_repeats_a_token_and_drops_the_last():
    ids, answer, c = run(only(duplicate_rate=0.2), [(3, 30)] * 100, 33, 1.0)
    n_repeats = 0
    for clean, noisy in answers(ids, answer, c):
        src = (noisy - ANSWER_BASE).tolist()  # index of the clean token each position holds
        steps = [b - a for a, b in zip(src, src[1:])]
        assert src[0] == 0 and set(steps) <= {0, 1}
        repeats = steps.count(0)
        assert src[-1] == len(clean) - 1 - repeats  # one token dropped off the end per repeat
        n_repeats += repeats
    assert n_repeats > 300


def test_span_shift_rotates_window():
    x = torch.arange(8)
    cases = [
        ((2, 2, +2), [0, 1, 4, 5, 2, 3, 6, 7]),
        ((2, 2, -1), [0, 2, 3, 1, 4, 5, 6, 7]),
        ((3, 1, +3), [0, 1, 2, 4, 5, 6, 3, 7]),
        ((5, 2, +3), [0, 1, 2, 3, 4, 7, 5, 6]),  # destination clipped at the end
        ((1, 2, -2), [1, 2, 0, 3, 4, 5, 6, 7]),  # destination clipped at the start
        ((6, 4, +1), list(range(8))),  # span reaches the end: nowhere to go
        ((0, 3, -2), list(range(8))),
    ]
    for (a, k, d), want in cases:
        y = x.clone()
        _span_shift(y, a, k, d)
        assert y.tolist() == want, (a, k, d)


def test_span_shift_keeps_multiset_and_moves_tokens():
    cfg = only(span_shift_rate=0.1, max_span=4, max_shift=2)
    ids, answer, c = run(cfg, [(3, 30)] * 100, 33, 1.0)
    n_changed = 0
    for clean, noisy in answers(ids, answer, c):
        assert sorted(noisy.tolist()) == clean.tolist()
        n_changed += (noisy != clean).any().item()
    assert n_changed > 80


def test_replacement_draws_only_from_pool():
    pool = torch.tensor([7001, 7002, 7003])
    ids, answer, c = run(only(replace_rate=1.0), [(3, 30)] * 20, 33, 1.0, replace_pool=pool)
    got = c.noisy_ids[answer]
    assert torch.isin(got, pool).all()
    assert set(got.tolist()) == {7001, 7002, 7003}


def test_replacement_default_pool_is_batch_answers():
    ids, answer, c = run(only(replace_rate=1.0), [(5, 3), (5, 20)], 25, 1.0)
    got = c.noisy_ids[answer]
    assert torch.isin(got, ids[answer]).all()  # never prompt, padding or mask tokens
    assert (got >= ANSWER_BASE + 3).any()  # row 0 also draws from row 1's answer


def test_edit_rates_scale_with_t():
    rows, t, slots = [(3, 30)] * 200, 0.4, 29 * 200  # p = rate * t = 0.2 per eligible position
    pool = torch.arange(5000, 5100)
    ids, answer, c = run(only(replace_rate=0.5), rows, 33, t, replace_pool=pool)
    assert abs(torch.isin(c.noisy_ids[answer], pool).float().mean().item() - 0.2) < 0.015
    ids, answer, c = run(only(duplicate_rate=0.5), rows, 33, t)
    repeats = sum((noisy[1:] == noisy[:-1]).sum().item() for _, noisy in answers(ids, answer, c))
    assert abs(repeats / slots - 0.2) < 0.02
    ids, answer, c = run(only(swap_rate=0.5), rows, 33, t)
    swaps = sum((noisy != clean).sum().item() / 2 for clean, noisy in answers(ids, answer, c))
    assert abs(swaps / slots - 0.2 / 1.2) < 0.02  # overlapping swaps skipped: rate p / (1 + p)


def test_full_mask_masks_whole_answer():
    ids, answer, c = run(only(full_mask_share=1.0), [(3, 10), (0, 20)], 20, 0.01)
    assert (c.noisy_ids[answer] == MASK).all()
    assert torch.equal(c.noisy_ids[~answer], ids[~answer])
    assert torch.equal(c.loss_mask, answer)


def test_draft_rows_have_edits_but_no_masks():
    """A draft row is what --polish reads: wrong tokens among right ones, no masks, every token supervised."""
    cfg = only(draft_share=0.5, mask_rate=1.0, replace_rate=0.5)
    rows = [(3, 30)] * 400
    ids, answer, c = run(cfg, rows, 33, 1.0)
    masked = [(noisy == MASK).any().item() for _, noisy in answers(ids, answer, c)]
    drafts = [i for i, m in enumerate(masked) if not m]
    assert abs(len(drafts) / len(rows) - 0.5) < 0.08  # the rest are fully masked at t = 1
    edited = [(noisy != clean).float().mean().item() for clean, noisy in answers(ids, answer, c)]
    assert abs(sum(edited[i] for i in drafts) / len(drafts) - 0.5) < 0.05
    assert torch.equal(c.loss_mask, answer)


def test_structural_all_ops_zero_is_identity():
    ids, answer, c = run(only(), [(3, 10), (0, 20)], 20, 1.0)
    assert torch.equal(c.noisy_ids, ids)
    assert torch.equal(c.loss_mask, answer)


# ---- levels --------------------------------------------------------------------------------


def test_stratified_levels_one_per_stratum():
    t_min, B = 0.05, 16
    for seed in range(5):
        t = sample_levels(B, t_min, torch.Generator().manual_seed(seed))
        assert t.shape == (B,) and (t >= t_min).all() and (t <= 1).all()
        strata = ((t.sort().values - t_min) / (1 - t_min) * B).floor().long()
        assert strata.tolist() == list(range(B))


def test_unstratified_levels_in_range():
    t = sample_levels(1000, 0.2, torch.Generator().manual_seed(0), stratified=False)
    assert (t >= 0.2).all() and (t <= 1).all()
    assert abs(t.mean().item() - 0.6) < 0.03


def test_validation_levels_are_stratum_midpoints():
    t = validation_levels(4, 0.2)
    assert torch.allclose(t, torch.tensor([0.3, 0.5, 0.7, 0.9]))
    assert torch.equal(t, validation_levels(4, 0.2))


# ---- determinism and mixing -----------------------------------------------------------------


@pytest.mark.parametrize("objective", ["mask", "structural", "mixed"])
def test_same_seed_same_corruption(objective):
    cfg = NoiseConfig(objective=objective, **ALL_ON)
    rows = [(4, 12), (0, 16), (10, 5)]
    _, _, a = run(cfg, rows, 20, 0.7, seed=5)
    _, _, b = run(cfg, rows, 20, 0.7, seed=5)
    _, _, other = run(cfg, rows, 20, 0.7, seed=6)
    assert_same(a, b)
    assert not torch.equal(a.noisy_ids, other.noisy_ids)


def test_per_row_generators_ignore_batch_composition():
    cfg = NoiseConfig(objective="mixed", **ALL_ON)

    def corrupt_rows(example_ids, rows):
        ids, answer = batch(rows, 40)
        levels = torch.full((len(rows),), 0.6)
        gens = [torch.Generator().manual_seed(k) for k in example_ids]
        return corrupt(ids, answer, levels, cfg, MASK, gens, replace_pool=torch.arange(500, 600))

    alone = corrupt_rows([7], [(3, 15)])
    for others in ([1, 7, 2], [7, 9], [4, 5, 6, 7]):
        rows = [(3, 15) if k == 7 else (k, 10 + k) for k in others]
        c = corrupt_rows(others, rows)
        i = others.index(7)
        for f in dataclasses.fields(Corruption):
            assert torch.equal(getattr(c, f.name)[i], getattr(alone, f.name)[0]), f.name


def test_mixed_share_of_structural_rows():
    cfg = NoiseConfig(objective="mixed", mixed_structural_prob=0.3)
    ids, answer, c = run(cfg, [(2, 4)] * 4000, 6, 0.5)
    assert abs(c.structural.float().mean().item() - 0.3) < 0.03
    assert torch.equal(c.loss_mask[c.structural], answer[c.structural])  # structural: all answer
    mask_rows = ~c.structural
    assert torch.equal(c.loss_mask[mask_rows], c.noisy_ids[mask_rows] == MASK)


# ---- config and argument checks ----------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("objective", "noise"), ("t_min", 0.0), ("t_min", 1.0), ("t_min", -0.5),
    ("mixed_structural_prob", 1.5), ("full_mask_share", -0.1), ("draft_share", 1.2), ("mask_rate", 2.0),
    ("replace_rate", -1.0), ("swap_rate", 1.01), ("duplicate_rate", -0.01),
    ("span_shift_rate", 3.0), ("max_span", 0), ("max_shift", 0), ("max_shift", 1.5), ("replace_from", "model"),
    ("replace_top_k", 0), ("wrong_weight", 0.0), ("wrong_weight", float("inf")),
])
def test_validate_rejects_bad_values(field, value):
    cfg = NoiseConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}:") as err:
        cfg.validate()
    assert str(value) in str(err.value)


def test_defaults_validate():
    NoiseConfig().validate()
    for objective in ("mask", "structural", "mixed"):
        NoiseConfig(objective=objective).validate()


def test_corrupt_rejects_bad_arguments():
    ids, answer = batch([(2, 5), (1, 6)], 8)
    gen = torch.Generator().manual_seed(0)
    cfg = NoiseConfig()
    with pytest.raises(ValueError, match="generator"):
        corrupt(ids, answer, torch.full((2,), 0.5), cfg, MASK, [gen])
    with pytest.raises(ValueError, match="levels"):
        corrupt(ids, answer, torch.zeros(2), cfg, MASK, gen)
    gappy = answer.clone()
    gappy[0, 4] = False
    with pytest.raises(ValueError, match="contiguous"):
        corrupt(ids, gappy, torch.full((2,), 0.5), cfg, MASK, gen)
    with pytest.raises(ValueError, match="replace_pool"):
        corrupt(ids, answer, torch.full((2,), 0.5), cfg, MASK, gen,
                replace_pool=torch.tensor([], dtype=torch.long))


# ---- properties ---------------------------------------------------------------------------------


@st.composite
def cases(draw):
    total_len = draw(st.integers(1, 24))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        p = draw(st.integers(0, total_len))
        rows.append((p, draw(st.integers(0, total_len - p))))
    rates = {k: draw(st.floats(0, 1)) for k in ALL_ON}
    cfg = NoiseConfig(objective=draw(st.sampled_from(["mask", "structural", "mixed"])),
                      max_span=draw(st.integers(1, 6)), max_shift=draw(st.integers(1, 6)),
                      **rates)
    levels = [draw(st.floats(1e-3, 1.0)) for _ in rows]
    return rows, total_len, cfg, torch.tensor(levels), draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_property_prompt_safe_and_deterministic(case):
    rows, total_len, cfg, levels, seed = case
    ids, answer = batch(rows, total_len)
    a = corrupt(ids, answer, levels, cfg, MASK, torch.Generator().manual_seed(seed))
    b = corrupt(ids, answer, levels, cfg, MASK, torch.Generator().manual_seed(seed))
    assert_same(a, b)
    assert a.noisy_ids.shape == ids.shape
    assert torch.equal(a.noisy_ids[~answer], ids[~answer])
    assert not (a.loss_mask & ~answer).any()
    assert (a.weights[~a.loss_mask] == 0).all() and (a.weights[a.loss_mask] > 0).all()
    # only answer tokens, the mask token, or (replaced) other answer tokens appear in the answer
    assert torch.isin(a.noisy_ids[answer], torch.cat([ids[answer], torch.tensor([MASK])])).all()
