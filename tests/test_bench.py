"""The benchmarks' pure helpers (eval/common.py): distinct-n, the parent's answer perplexity, the results.md
splice. No timing is asserted anywhere: benchmarks measure, tests check the arithmetic."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_END, BENCH_START, answer_nll, distinct_n, perplexity, splice, splice_file  # noqa: E402

from conftest import make_tiny_model  # noqa: E402


def test_distinct_n_counts_unique_ngrams_over_all_answers():
    answers = [[1, 2, 1, 2], [1, 2, 3]]
    assert distinct_n(answers, 1) == pytest.approx(3 / 7)
    # bigrams: (1,2) (2,1) (1,2) | (1,2) (2,3) -> 3 unique of 5
    assert distinct_n(answers, 2) == pytest.approx(3 / 5)
    assert distinct_n([[5]], 2) is None and distinct_n([], 1) is None


def test_parent_perplexity_matches_a_hand_computation():
    from lad.modeling.denoiser import Denoiser

    prompts = [[10, 11, 12], [20, 21, 22, 23, 24]]
    answers = [[30, 31], [40, 41, 42, 43]]
    denoiser = Denoiser(make_tiny_model(seed=3), mask_id=265)  # bidirectional; parent_logits must undo it
    nll = answer_nll(denoiser.parent_logits, prompts, answers, batch_size=2)
    reference = make_tiny_model(seed=3)  # the same weights, never patched: the causal model by hand
    for p, a, got in zip(prompts, answers, nll):
        with torch.no_grad():
            logp = reference(torch.tensor([p + a])).logits[0].log_softmax(-1)
        want = -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
        assert got == pytest.approx(want, abs=1e-4)
    assert perplexity(nll, [2, 4]) == pytest.approx(math.exp(sum(nll) / 6))
    assert answer_nll(denoiser.parent_logits, [[1, 2]], [[]]) == [0.0]
    assert perplexity([0.0], [0]) is None


def test_splice_keeps_everything_outside_the_markers_byte_identical(tmp_path):
    before = "# Results\r\n\nintro ünïcode\n<!-- ablation:start -->\nkeep\n<!-- ablation:end -->\n"
    after = "\n\ntail  \n\twith tabs\n"
    path = tmp_path / "results.md"
    path.write_bytes(f"{before}{BENCH_START}\nold\nlines\n{BENCH_END}{after}".encode())
    splice_file(path, "new table\n")
    data = path.read_bytes().decode()
    assert data == f"{before}{BENCH_START}\nnew table\n{BENCH_END}{after}"
    splice_file(path, "again")  # idempotent layout
    assert path.read_bytes().decode() == f"{before}{BENCH_START}\nagain\n{BENCH_END}{after}"


@pytest.mark.parametrize("text", ["no markers", f"{BENCH_START} only", f"{BENCH_END} then {BENCH_START}",
                                  f"{BENCH_START}{BENCH_END}{BENCH_START}{BENCH_END}"])
def test_splice_refuses_without_one_pair_of_markers(text, tmp_path):
    with pytest.raises(ValueError):
        splice(text, "x")
    path = tmp_path / "r.md"
    path.write_text(text)
    with pytest.raises(ValueError):
        splice_file(path, "x")
    assert path.read_text() == text


def test_conversion_clock_rebuilds_training_time_from_logged_throughput():
    from eval.conversion import elapsed

    metrics = [{"step": 0, "val_loss": 9.0},  # validation lines carry no throughput
               {"step": 1, "tokens": 100, "tokens_per_s": 50.0},  # 2 s
               {"step": 2, "tokens": 400, "tokens_per_s": 100.0},  # +3 s
               {"step": 2, "val_loss": 5.0},
               {"step": 3, "tokens": 500, "tokens_per_s": 20.0}]  # +5 s
    assert elapsed(metrics) == {1: pytest.approx(2.0), 2: pytest.approx(5.0), 3: pytest.approx(10.0)}


def test_conversion_table_puts_each_task_next_to_the_parent():
    from eval.conversion import table

    def rec(acc, norm, **kw):
        return {"acc": acc, "acc_stderr": 0.03, "acc_norm": norm, "limit": 200, **kw}

    summary = {"train": {"steps": 240, "tokens": 300_000, "train_s": 3600.0},
               "parent": {"arc_easy": rec(0.5, 0.37), "mmlu": rec(0.3, None)},
               "final": {"arc_easy/l2r": rec(0.45, 0.30, task="arc_easy", order="l2r"),
                         "mmlu/l2r": rec(0.32, None, task="mmlu", order="l2r")},
               "curve": {"60": rec(0.40, 0.25, task="arc_easy", order="l2r", step=60, tokens=75_000, train_s=900.0)}}
    text = table(summary)
    assert "| arc_easy | 200 | 0.500 ± 0.030 | 0.450 (-0.050) | 0.370 | 0.300 |" in text
    assert "| mmlu | 200 | 0.300 ± 0.030 | 0.320 (+0.020) | - | - |" in text
    assert "240 steps, 300,000 training tokens, 60 training minutes" in text
    # the curve ends with the final weights, at the run's full budget
    assert "| 60 | 75,000 | 15 | 0.400 | 0.250 |" in text and "| 240 | 300,000 | 60 | 0.450 | 0.300 |" in text
