"""Paired LAD-vs-parent statistics (lad/scoring/paired.py), checked on cases worked out by hand."""

from __future__ import annotations

import pytest

from lad.scoring.paired import interval_cell, mcnemar_p, paired_interval, paired_rows


def test_mcnemar_by_hand():
    # discordant documents: LAD alone right on 1, the parent alone right on 5 (and two ties either way)
    lad = [1, 0, 0, 0, 0, 0, 1, 0]
    parent = [0, 1, 1, 1, 1, 1, 1, 0]
    assert mcnemar_p(lad, parent) == pytest.approx(2 * (1 + 6) / 64)  # 2 · P(Bin(6, 1/2) <= 1) = 0.21875
    assert mcnemar_p([1, 0], [1, 0]) == 1.0  # no discordant document: no evidence either way
    assert mcnemar_p([1] * 10, [0] * 10) == pytest.approx(2 / 1024)


def test_paired_interval_by_hand():
    delta, low, high = paired_interval([1, 1, 1, 1], [0, 0, 0, 0])
    assert (delta, low, high) == (1.0, 1.0, 1.0)  # every document differs by exactly 1
    a = [1, 0] * 500
    delta, low, high = paired_interval(a, [0] * 1000)  # differences: half 1, half 0
    assert delta == 0.5
    half = 1.96 * (0.25 / 1000) ** 0.5  # the normal approximation the bootstrap must agree with at n = 1000
    assert low == pytest.approx(0.5 - half, abs=0.006) and high == pytest.approx(0.5 + half, abs=0.006)
    assert paired_interval(a, [0] * 1000) == (delta, low, high)  # seeded: the same table every time
    with pytest.raises(ValueError):
        paired_interval([], [])


def test_paired_rows_match_documents_by_id_and_pool_groups():
    def samples(values):
        return [{"doc_id": i, "acc": v, "acc_norm": v} for i, v in values]
    lad = {"samples": {"a": samples([(0, 1), (1, 0), (2, 1)]), "b": samples([(0, 1)])},
           "group_subtasks": {"g": ["a", "b"]}}
    parent = {"samples": {"a": samples([(2, 1), (1, 1), (0, 0)]), "b": samples([(0, 0), (5, 1)])}}
    rows = paired_rows(lad, parent)
    assert rows[("a", "acc")]["n"] == 3 and rows[("a", "acc")]["delta"] == pytest.approx(0.0)
    assert rows[("b", "acc")]["n"] == 1 and rows[("b", "acc")]["delta"] == 1.0  # doc 5 only the parent scored
    assert rows[("g", "acc")]["n"] == 4 and rows[("g", "acc")]["delta"] == pytest.approx(0.25)
    assert "n=4" in interval_cell(rows[("g", "acc")]) and interval_cell(None) == "-"
    assert "n=" not in interval_cell(rows[("g", "acc")], documents=False)
    assert interval_cell(rows[("g", "acc")]).startswith(interval_cell(rows[("g", "acc")], documents=False) + " (n=")
