"""metrics.jsonl across resumes: no duplicate final validation, a line cut short by a crash is dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lad.finetune import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path):
    out = tmp_path / "run"
    args = [TINY, f"output_dir={out}", "max_steps=4", "eval_every=2", "save_every=2"]
    assert main(args) == 0
    before = lines(out)
    assert main([*args, "resume_from=latest"]) == 0  # from the final checkpoint: nothing left to train
    assert lines(out) == before


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = ["max_steps=4", "eval_every=2", "save_every=2", "log_every=1"]
    assert main([TINY, f"output_dir={whole}", *common]) == 0
    assert main([TINY, f"output_dir={cut}", *common]) == 0
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    text = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(text + '{"step": 5, "lo')  # power cut mid-write
    assert main([TINY, f"output_dir={cut}", *common, "resume_from=latest"]) == 0

    def comparable(entries):  # throughput differs between runs
        return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in entries]

    assert comparable(lines(cut)) == comparable(lines(whole))
