"""Crash and resume: a run killed with SIGKILL at any moment resumes from its newest complete checkpoint and
ends with exactly the adapter (bitwise), best weights and training losses of an uninterrupted run.

Kills are real SIGKILLs of separate processes:
- the real CLI (`python lad/finetune.py`) killed from outside once its first checkpoint appears;
- forked training processes that SIGKILL themselves at exact moments through a hook (half-way through
  writing a checkpoint file; after the last checkpoint but before the final adapter). Forking reuses the
  test's imports, so a crash costs ~1 s instead of a 10 s interpreter start.
Resumes run in-process (`main([... "resume_from=latest"])`), as does the uninterrupted reference.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lad.finetune import main
from lad.checkpoints import checkpoint_problem, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
STEPS = 12
ARGS = [f"max_steps={STEPS}", "save_every=2", "eval_every=4", "keep_checkpoints=3"]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")


def train(out: Path, *extra: str) -> None:
    assert main([TINY, f"output_dir={out}", *ARGS, *extra]) == 0


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def metrics(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training entries by step, validation entries by step), throughput left out."""
    train_rows, val_rows = {}, {}
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("tokens_per_s", None)
        (val_rows if "val_loss" in row else train_rows)[row["step"]] = row
    return train_rows, val_rows


def assert_same_run(out: Path, ref: Path) -> None:
    """Bitwise: final adapter, best/ adapter, every logged loss; and no staging folders left behind."""
    a, b = adapter(out), adapter(ref)
    assert a.keys() == b.keys() and len(a) > 0
    for key in b:
        assert torch.equal(a[key], b[key]), key
    best_a, best_b = adapter(out / "best"), adapter(ref / "best")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_b)
    assert json.loads((out / "best" / "lad.json").read_text())["step"] == \
        json.loads((ref / "best" / "lad.json").read_text())["step"]
    assert metrics(out) == metrics(ref)
    assert json.loads((out / "lad.json").read_text())["step"] == STEPS
    assert [p.name for p in list_checkpoints(out)] == [p.name for p in list_checkpoints(ref)]
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "reference"
    train(out)
    assert [p.name for p in list_checkpoints(out)] == ["step-000008", "step-000010", "step-000012"]
    return out


def resume(out: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lad"):
        train(out, "resume_from=latest")


def resumed_from(caplog) -> int:
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    return int(line.rsplit(" ", 1)[1])


# ---------------------------------------------------------------- a forked trainer that kills itself


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crashing_child(out: str, where: str) -> None:
    import lad.finetune
    import lad.run

    real_save, real_weights = torch.save, lad.finetune.save_weights

    def save(obj, path, *args, **kwargs):  # checkpoint step 4: optimizer.pt half written, then SIGKILL
        real_save(obj, path, *args, **kwargs)
        if where == "mid_file" and Path(path).name == "optimizer.pt" and Path(path).parent.name == ".tmp-step-000004":
            size = os.path.getsize(path)
            with open(path, "r+b") as fh:
                fh.truncate(size // 2)
                os.fsync(fh.fileno())
            _die()

    def weights(model, folder):  # after the last checkpoint, before the final adapter is complete
        if where == "before_final" and Path(folder) == Path(out):
            _die()
        real_weights(model, folder)

    torch.save = save
    lad.finetune.save_weights = weights
    sys.exit(main([TINY, f"output_dir={out}", *ARGS]))


def crash_forked(out: Path, where: str) -> None:
    child = multiprocessing.get_context("fork").Process(target=_crashing_child, args=(str(out), where))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, f"the child did not die by SIGKILL (exit {child.exitcode})"


# ---------------------------------------------------------------- tests


def test_sigkill_of_the_cli_after_its_first_checkpoint(reference, tmp_path, caplog):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "lad/finetune.py", TINY, f"output_dir={out}", *ARGS], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list_checkpoints(out) and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "lad.json").exists()  # killed mid-run: not a finished run
    resume(out, caplog)
    assert 2 <= resumed_from(caplog) < STEPS
    assert_same_run(out, reference)


def test_sigkill_while_a_checkpoint_file_is_written(reference, tmp_path, caplog):
    out = tmp_path / "run"
    crash_forked(out, "mid_file")
    staged = out / "checkpoints" / ".tmp-step-000004"
    assert staged.is_dir() and not (staged / "state.json").exists()  # a partial checkpoint was left behind
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]  # ...never under a checkpoint's name
    resume(out, caplog)
    assert resumed_from(caplog) == 2
    assert_same_run(out, reference)


def test_sigkill_after_the_last_checkpoint_before_the_final_adapter(reference, tmp_path, caplog):
    out = tmp_path / "run"
    crash_forked(out, "before_final")
    assert (out / "checkpoints" / "step-000012" / "state.json").is_file() and not (out / "lad.json").exists()
    resume(out, caplog)
    assert resumed_from(caplog) == STEPS
    assert_same_run(out, reference)


def test_partial_and_corrupt_checkpoints_are_reported_and_skipped(reference, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "lad.json", "README.md"):
        (out / name).unlink(missing_ok=True)  # as if killed before the end
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 10))
    newest, middle = out / "checkpoints" / "step-000012", out / "checkpoints" / "step-000010"
    weights = newest / "adapter_model.safetensors"
    with open(weights, "r+b") as fh:  # a truncated file
        fh.truncate(weights.stat().st_size - 100)
    (middle / "state.json").unlink()  # a checkpoint that never finished
    assert checkpoint_problem(newest).startswith("adapter_model.safetensors has")
    assert checkpoint_problem(middle) == "no state.json (interrupted while saving?)"

    resume(out, caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping checkpoint" in w and "step-000012" in w and "bytes, expected" in w for w in warnings)
    assert any("skipping checkpoint" in w and "step-000010" in w and "no state.json" in w for w in warnings)
    assert resumed_from(caplog) == 8
    assert_same_run(out, reference)  # the broken checkpoints were rewritten whole
