"""eval/ablate.py's bookkeeping: a variant trains once; a later sweep that needs scores of a variant whose weights
are gone retrains it and records whether the rerun reproduced the first run's validation losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval.ablate as ablate  # noqa: E402


def fake_trainer(tmp_path, monkeypatch, val_losses):
    calls = []

    def run_logged(cmd, log):
        out = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        lines = [{"step": 1, "loss": 5.0, "tokens": 10}, {"step": 2, "val_loss": val_losses[len(calls)]}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        (out / "adapter_model.safetensors").write_bytes(b"x")
        calls.append(cmd)
        return 1.5

    monkeypatch.setattr(ablate, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(ablate, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(ablate, "run_logged", run_logged)
    return calls


def test_a_variant_with_weights_is_not_trained_again(tmp_path, monkeypatch):
    calls = fake_trainer(tmp_path, monkeypatch, [4.0, 4.0])
    first = ablate.train("mask", [], 2)
    assert len(calls) == 1 and first["val"] == [{"step": 2, "val_loss": 4.0}] and "first_run" not in first
    assert ablate.train("mask", [], 2) == first and len(calls) == 1


def test_lost_weights_are_retrained_only_when_needed_and_the_rerun_is_checked(tmp_path, monkeypatch):
    calls = fake_trainer(tmp_path, monkeypatch, [4.0, 4.0, 3.0, 3.0])
    ablate.train("mask", [], 2)
    (tmp_path / "runs" / "mask" / "adapter_model.safetensors").unlink()
    assert "first_run" not in ablate.train("mask", [], 2, need_weights=False) and len(calls) == 1
    again = ablate.train("mask", [], 2)
    assert len(calls) == 2 and again["reproduced_val"] is True and again["first_run"]["wall_s"] == 1.5
    (tmp_path / "runs" / "mask" / "adapter_model.safetensors").unlink()
    assert ablate.train("mask", [], 2)["reproduced_val"] is False  # a rerun that drifted says so
    (tmp_path / "runs" / "mask" / "adapter_model.safetensors").unlink()
    third = ablate.train("mask", [], 2)  # checked against the first run, not against the drifted rerun before it
    assert third["reproduced_val"] is False and third["first_run"]["val"] == [{"step": 2, "val_loss": 4.0}]


def test_report_tables_put_every_task_next_to_the_parent_and_tolerate_missing_acc_norm():
    from eval.ablation_report import table, tasks_table

    score = lambda acc, norm=None: {"acc": acc, "acc_norm": norm}  # noqa: E731
    train = {"steps": 80, "tokens": 1000, "wall_s": 600, "val": [{"step": 0, "val_loss": 7.0},
                                                                 {"step": 80, "val_loss": 4.0}]}
    summary = {
        "parent": {"arc_easy": score(0.5, 0.37), "mmlu": score(0.25)},
        "variant_overrides": {"a": ["shift=true"], "b": []},
        "variants": {"a": {"train": train, "scores": {"arc_easy/confidence": score(0.47, 0.29),
                                                      "arc_easy/l2r": score(0.55, 0.37), "mmlu/l2r": score(0.26)}},
                     "b": {"train": train, "scores": {"arc_easy/l2r": score(0.4, 0.3)}}},
    }
    main = table(summary).splitlines()
    assert main[2].startswith("| AR parent | adapter off, causal |") and "| 0.500 | 0.370 |" in main[2]
    assert "| a | shift=true | 80 | 1,000 | 10 | 7.00 → 4.00 | 0.470 / 0.550 | 0.290 / 0.370 |" in main[3]
    assert "| b | - |" in main[4] and "| - / 0.400 |" in main[4]
    more = tasks_table(summary).splitlines()
    assert more[0] == "| | arc_easy acc conf / l2r | arc_easy acc_norm l2r | mmlu acc conf / l2r | mmlu acc_norm l2r |"
    assert more[2] == "| AR parent | 0.500 | 0.370 | 0.250 | - |"
    assert more[3] == "| a | 0.470 / 0.550 | 0.370 | - / 0.260 | - |" and len(more) == 4  # b has one task only


def test_tasks_plot_draws_only_variants_scored_on_several_tasks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import eval.ablation_report as report

    monkeypatch.setattr(report, "IMG", tmp_path)
    score = {"acc": 0.5, "acc_stderr": 0.03}
    single = {"parent": {"arc_easy": score}, "variants": {"b": {"scores": {"arc_easy/l2r": score}}}}
    assert report.tasks_plot(single, {"b": "C0"}) is None and not list(tmp_path.iterdir())
    several = {"parent": {"arc_easy": score, "mmlu": score},
               "variants": {"a": {"scores": {"arc_easy/confidence": score, "mmlu/l2r": score}},
                            "b": {"scores": {"arc_easy/l2r": score}}}}
    assert report.several_tasks(several) == (["a"], ["arc_easy", "mmlu"])
    path = report.tasks_plot(several, {"a": "C0", "b": "C1"})
    assert path == tmp_path / "ablation_tasks.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_minutes_are_the_faster_of_a_variants_runs():
    from eval.ablation_report import train_minutes

    assert train_minutes({"wall_s": 600.0}) == 10
    assert train_minutes({"wall_s": 1800.0, "first_run": {"wall_s": 1200.0}}) == 20  # a rerun on a shared CPU
    assert train_minutes({"wall_s": 900.0, "first_run": {"wall_s": 1500.0}}) == 15
