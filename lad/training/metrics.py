"""metrics.jsonl, one JSON object a line (main process), mirrored to the recipe's trackers (`report_to`).

A resumed run first drops the lines logged after its checkpoint, so the file reads as one uninterrupted run
(plus a line naming any settings the resume changed).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from lad.recipe import Recipe
from lad.resume import ResumePlan
from lad.run import RunDirError

log = logging.getLogger("lad.finetune")  # the whole recipe logs under one name


class Metrics:
    """Where a run's curves go: `record(entry)` writes a line (main process) and logs to the trackers."""

    def __init__(self, accelerator, recipe: Recipe, out: Path, start_step: int, plan: ResumePlan):
        self.accelerator, self.trackers = accelerator, bool(recipe.report_to)
        main = accelerator.is_main_process
        if recipe.report_to:
            accelerator.init_trackers("lad", config={k: str(v) for k, v in recipe.to_dict().items()})
        path = out / "metrics.jsonl"
        if main and start_step and path.is_file():  # drop lines logged after the checkpoint
            kept = [line for line in metric_lines(path) if json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8") if main else None
        if main and plan.changes:  # a resume that changed settings says so where the curves are read
            self.file.write(json.dumps({"step": start_step, "resumed_from": str(plan.checkpoint),
                                        "changes": plan.changes}) + "\n")

    def record(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.trackers:
            self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Throughput:
    """Input tokens per second between calls, for the progress bar and the metrics line."""

    def __init__(self):
        self.time, self.tokens = time.perf_counter(), 0

    def __call__(self, tokens_seen: int) -> float:
        now = time.perf_counter()
        rate = (tokens_seen - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, tokens_seen
        return rate


def metric_lines(path: Path) -> list[str]:
    """The complete lines of a metrics.jsonl; a last line cut short by a crash is dropped with a warning."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise RunDirError(f"{path}: line {i + 1} is not JSON (edited by hand?)") from None
            log.warning("%s: dropping its last line, cut short (%r)", path, line[:40])
            return lines[:-1]
    return lines


def gpu_memory(device) -> dict:
    """Peak CUDA memory since the start (allocated by tensors, reserved by the caching allocator), in MiB, for
    the metrics line: what a user sizes the next GPU by. Nothing on other devices."""
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20),
            "gpu_peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20)}
