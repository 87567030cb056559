"""Nothing lost, ever (lad/safety.py, lad/resume.py, lad/stopping.py): LAD deletes and overwrites only what it
wrote; resume is safe and honest; Ctrl-C and SIGTERM stop cleanly; disk-full and read-only end in one line.

The data-loss cases that were reported are reproduced here and fail on the code before the fix: an empty
output_dir with overwrite=true deleted the current directory's files; resume_from=latest on a user's folder
overwrote its tokenizer.json and README.md; `lad export RUN --out RUN/best --overwrite` replaced the run's weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, TINY_RECIPE, read_adapter, read_metrics, train_tiny

from lad.export import main as lad_export
from lad.finetune import main as lad_finetune
from lad.safety import EVAL, EXPORT, FILE, RUN, PathError, check_destination, normalised

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def fake_run(folder: Path, **lad) -> Path:
    folder.mkdir(parents=True)
    (folder / "lad.json").write_text(json.dumps({"mask_token": "m", **lad}), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if not lad.get("merged"):
        (folder / "checkpoints").mkdir()
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints (steps 2 and 4), best/ and base/ (the tiny recipe's scratch base)."""
    return train_tiny(tmp_path_factory.mktemp("safety") / "run", "max_steps=4", "save_every=2", "eval_every=2")


# ---------------------------------------------------------------- the one decision, case by case


@pytest.mark.parametrize("raw", ["", "   "])
def test_an_empty_path_is_refused(raw):
    with pytest.raises(PathError, match="empty path"):
        check_destination(raw, kind=RUN, flag="output_dir", overwrite=True)


def test_paths_are_normalised_home_expanded_symlinks_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalised("~/runs/x", "output_dir") == tmp_path.resolve() / "runs" / "x"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (tmp_path / "link").symlink_to(user)
    with pytest.raises(PathError, match="files LAD did not write|holds files"):
        check_destination(tmp_path / "link", kind=RUN, flag="output_dir", overwrite=True)
    real = fake_run(tmp_path / "a_run")
    (tmp_path / "run_link").symlink_to(real)
    assert check_destination(tmp_path / "run_link", kind=RUN, flag="output_dir", overwrite=True) == real.resolve()


@pytest.mark.parametrize("where, reason", [("cwd", "the current directory"), ("home", "the home directory"),
                                           ("parent", "a parent of the current directory"),
                                           ("root", "a filesystem root")])
def test_protected_folders_are_never_replaced_even_when_they_look_like_runs(tmp_path, monkeypatch, where, reason):
    project, home = fake_run(tmp_path / "project"), fake_run(tmp_path / "home")
    if where == "parent":
        (tmp_path / "lad.json").write_text("{}")
    place = {"cwd": project, "home": home, "parent": tmp_path, "root": Path("/")}[where]
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    with pytest.raises(PathError, match=reason):
        check_destination(str(place), kind=RUN, flag="output_dir", overwrite=True)


def test_overwrite_replaces_only_a_lad_artefact_of_the_same_kind_holding_only_lad_files(tmp_path):
    clean = fake_run(tmp_path / "clean")
    assert check_destination(clean, kind=RUN, flag="output_dir", overwrite=True) == clean
    with pytest.raises(PathError, match="already holds a LAD run: pass overwrite=true"):
        check_destination(clean, kind=RUN, flag="output_dir")
    with pytest.raises(PathError, match="it is a LAD run, not a LAD export"):
        check_destination(clean, kind=EXPORT, flag="--out", overwrite=True)
    export = fake_run(tmp_path / "export", merged=True)
    with pytest.raises(PathError, match="it is a LAD export, not a LAD run"):
        check_destination(export, kind=RUN, flag="output_dir", overwrite=True)
    assert check_destination(export, kind=EXPORT, flag="--out", overwrite=True) == export
    notes = fake_run(tmp_path / "annotated")
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(PathError, match=r"holds files LAD did not write \(notes.txt\)"):
        check_destination(notes, kind=RUN, flag="output_dir", overwrite=True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "recipe.yaml").write_text("max_steps: 3\n")  # a user's own recipe does not make a folder a run
    (user / "README.md").write_text("mine")
    with pytest.raises(PathError, match=r"holds files LAD did not write \(README.md and 1 more\)"):
        check_destination(user, kind=RUN, flag="output_dir", overwrite=True)


def test_names_other_tools_use_too_do_not_make_a_folder_a_run(tmp_path):
    project = tmp_path / "project"  # another framework's checkpoints/ and metrics.jsonl, a user's recipe.yaml
    (project / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    (project / "metrics.jsonl").write_text("{}\n")
    assert check_destination(project / "runs" / "x", kind=RUN, flag="output_dir") == project.resolve() / "runs" / "x"
    (project / "checkpoints" / "step-000010").mkdir()
    (project / "checkpoints" / "step-000010" / "state.json").write_text("{}")  # now it is LAD's
    with pytest.raises(PathError, match="lies inside the LAD run"):
        check_destination(project / "runs" / "x", kind=RUN, flag="output_dir")


def test_nothing_is_written_inside_a_run_except_its_eval_results(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "best").mkdir()
    for kind, flag in ((RUN, "output_dir"), (EXPORT, "--out")):
        for target in (run / "best", run / "new", run / "checkpoints" / "x"):
            with pytest.raises(PathError, match="lies inside the LAD run"):
                check_destination(target, kind=kind, flag=flag, overwrite=True)
    assert check_destination(run / "eval", kind=EVAL, flag="--output_path") == run / "eval"


def test_files_and_results_are_never_overwritten_and_parents_must_be_folders(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PathError, match="a_file is a file, not a folder"):
        check_destination(tmp_path / "a_file" / "run", kind=RUN, flag="output_dir")
    with pytest.raises(PathError, match="is a folder, not a file"):
        check_destination(tmp_path, kind=FILE, flag="--out")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(PathError, match="results.json already exists"):
        check_destination(tmp_path / "results.json", kind=EVAL, flag="--output_path")
    (tmp_path / "mine.md").write_text("my notes")  # lad-eval writes NAME.json and NAME.md
    with pytest.raises(PathError, match="mine.md already exists"):
        check_destination(tmp_path / "mine.json", kind=EVAL, flag="--output_path")
    assert check_destination(tmp_path / "new.jsonl", kind=FILE, flag="--out") == tmp_path.resolve() / "new.jsonl"


# ---------------------------------------------------------------- the reported data losses, through the CLIs


def test_an_empty_output_dir_with_overwrite_deletes_nothing(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    (work / "lad.json").write_text("{}")  # even a folder that looks like a run: it is the current directory
    monkeypatch.chdir(work)
    before = tree(work)
    assert lad_finetune([TINY_RECIPE, "output_dir=", "overwrite=true", "max_steps=1", *FAST]) == 2
    assert "output_dir: empty path" in capsys.readouterr().err
    assert lad_finetune([TINY_RECIPE, "output_dir=.", "overwrite=true", "max_steps=1", *FAST]) == 2
    assert "it is the current directory" in capsys.readouterr().err
    assert tree(work) == before


def test_resume_in_a_users_folder_refuses_and_touches_nothing(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "tokenizer.json").write_text("my tokenizer")
    (user / "README.md").write_text("my readme")
    before = tree(user)
    assert lad_finetune([TINY_RECIPE, f"output_dir={user}", "resume_from=latest", "max_steps=1", *FAST]) == 2
    assert "not a LAD run" in capsys.readouterr().err
    assert tree(user) == before


@pytest.mark.parametrize("inside", ["best", "base", "checkpoints/step-000002"])
def test_export_into_its_own_run_is_refused(run, capsys, inside):
    before = tree(run)
    assert lad_export([str(run), "--out", str(run / inside), "--overwrite"]) == 2
    assert "lies inside the LAD run" in capsys.readouterr().err
    assert tree(run) == before


def test_an_export_replaces_only_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "model"
    assert lad_export([str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    assert lad_export([str(run), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    (out / "my_notes.md").write_text("mine")
    assert lad_export([str(run), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 2
    assert "holds files LAD did not write (my_notes.md)" in capsys.readouterr().err
    assert (out / "my_notes.md").read_text() == "mine"


# ---------------------------------------------------------------- resume: safe and honest


def args_of(out: Path, *extra: str) -> list[str]:
    return [TINY_RECIPE, f"output_dir={out}", "save_every=2", "eval_every=2", *extra]


def test_resuming_a_finished_run_with_fewer_or_equal_steps_has_nothing_to_do(run, capsys):
    before = tree(run)
    assert lad_finetune(args_of(run, "max_steps=2", "resume_from=latest")) == 0
    assert "at step 4, past max_steps 2: nothing to do" in capsys.readouterr().err
    assert lad_finetune(args_of(run, "max_steps=4", "resume_from=latest")) == 0
    assert "already finished its 4 steps: nothing to do" in capsys.readouterr().err
    assert tree(run) == before


def test_resume_refuses_changes_to_what_the_run_is_and_names_them(run, capsys):
    before = tree(run)
    assert lad_finetune(args_of(run, "max_steps=6", "lora.r=4", "shift=true", "resume_from=latest")) == 2
    err = capsys.readouterr().err
    assert "lora.r: 16 in the run, 4 now" in err and "shift: False in the run, True now" in err
    assert lad_finetune(args_of(run, "max_steps=6", "optim.lr=0.001", "resume_from=latest")) == 2
    assert "pass --allow-change optim.lr" in capsys.readouterr().err
    assert lad_finetune(args_of(run, "max_steps=6", "resume_from=latest", "--allow-change", "lora.r")) == 2
    assert "--allow-change lora.r: not a setting a resume may change" in capsys.readouterr().err
    assert tree(run) == before


def test_resume_refuses_data_edited_since_the_checkpoint(tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    lines = (REPO / "recipes" / "data" / "tiny_tasks.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:200]) + "\n")
    out = train_tiny(tmp_path / "run", "max_steps=2", *FAST, f"data.train.0.path={data}")
    data.write_text("\n".join(lines[:199] + [lines[300]]) + "\n")  # one row edited, same file name
    assert lad_finetune([TINY_RECIPE, f"output_dir={out}", "max_steps=4", *FAST, f"data.train.0.path={data}",
                         "resume_from=latest"]) == 2
    assert "the training data differ from those" in capsys.readouterr().err


def test_allowed_changes_are_applied_and_recorded(tmp_path, capsys):
    from lad.finetune import build_scheduler
    from lad.recipe import load_recipe

    out = train_tiny(tmp_path / "run", "max_steps=4", "save_every=2", "eval_every=0")
    assert lad_finetune([TINY_RECIPE, f"output_dir={out}", "max_steps=6", "save_every=2", "eval_every=0",
                         "optim.lr=0.001", "resume_from=latest", "--allow-change", "optim.lr"]) == 0
    rows = read_metrics(out)
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["step"] == 4
    assert resumed[0]["changes"] == {"max_steps": [4, 6], "optim.lr": [0.003, 0.001]}
    history = [line for line in (out / "recipe.yaml").read_text().splitlines() if line.startswith("# resumed")]
    assert history == ["# resumed at step 4 from step-000004: max_steps: 4 -> 6; optim.lr: 0.003 -> 0.001"]
    new = load_recipe(TINY_RECIPE, ["max_steps=6", "optim.lr=0.001"])  # what the new schedule gives at steps 5, 6
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=new.optim.lr)
    scheduler = build_scheduler(new, optimizer, 6)
    expected = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr()[0])
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert logged[5] == pytest.approx(expected[4]) and logged[6] == pytest.approx(expected[5])
    assert logged[4] == pytest.approx(0.003 * build_scheduler(load_recipe(TINY_RECIPE, ["max_steps=4"]),
                                                              torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                                                                              lr=0.003), 4).lr_lambdas[0](4))


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


def test_ctrl_c_stops_after_a_checkpoint_and_the_resumed_run_is_bitwise_the_same(tmp_path, monkeypatch, capsys):
    import lad.training.step as training_step  # where `train_step` gathers each step's statistics

    args = ["max_steps=6", "save_every=4", "eval_every=2"]
    reference = train_tiny(tmp_path / "reference", *args)
    real, calls = training_step.gather_stats, []

    def ctrl_c_at_step_3(accelerator, stats):  # a real SIGINT to this process, in the middle of step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(accelerator, stats)

    monkeypatch.setattr(training_step, "gather_stats", ctrl_c_at_step_3)
    out = tmp_path / "run"
    capsys.readouterr()
    assert lad_finetune([TINY_RECIPE, f"output_dir={out}", *args]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    hint = [line for line in err.splitlines() if "interrupted" in line]
    assert len(hint) == 1 and "after step 3" in hint[0] and f"output_dir={out}" in hint[0]
    assert hint[0].endswith("resume_from=latest") and (out / "checkpoints" / "step-000003").is_dir()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    monkeypatch.setattr(training_step, "gather_stats", real)
    assert lad_finetune([TINY_RECIPE, f"output_dir={out}", *args, "resume_from=latest"]) == 0
    a, b = read_adapter(out), read_adapter(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(reference)]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(out)] == strip


def test_sigterm_to_the_real_cli_exits_143_with_one_hint_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "lad" / "finetune.py"), TINY_RECIPE, f"output_dir={out}",
                             "max_steps=100000", "save_every=0", "eval_every=0"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    hint = [line for line in err.splitlines() if "interrupted (SIGTERM)" in line]
    assert len(hint) == 1 and hint[0].endswith("resume_from=latest"), err[-2000:]
    step = int(hint[0].split("after step ")[1].split(",")[0])
    assert (out / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()


def test_ctrl_c_while_loading_exits_130_before_training(tmp_path, monkeypatch, capsys):
    import lad.finetune as finetune

    def interrupted_load(recipe):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have interrupted the load")

    monkeypatch.setattr(finetune, "load_model", interrupted_load)
    assert lad_finetune([TINY_RECIPE, f"output_dir={tmp_path / 'run'}", "max_steps=2", *FAST]) == 130
    err = capsys.readouterr().err
    assert "before training started" in err and "Traceback" not in err


# ---------------------------------------------------------------- the operating system says no


@pytest.fixture
def mounted(tmp_path):
    """A small tmpfs, mounted with the given options (root only; skipped where mounting is not allowed)."""
    done = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(done)}"
        where.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        done.append(where)
        return where

    yield mount
    for where in done:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_ends_in_one_line_naming_the_path_and_leaves_no_staging_folder(mounted, capsys):
    full = mounted("size=160k")
    assert lad_finetune([TINY_RECIPE, f"output_dir={full / 'run'}", "max_steps=2", *FAST]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{full / 'run'}" in errors[0] and "No space left on device" in errors[0], err
    assert "Traceback" not in err
    assert not [p for p in full.rglob("*") if p.name.startswith(".tmp-")]


def test_a_read_only_filesystem_is_named_before_anything_loads(mounted, capsys, monkeypatch):
    import lad.finetune as finetune

    read_only = mounted("ro,size=64k")
    monkeypatch.setattr(finetune, "load_model", lambda recipe: pytest.fail("loaded a model"))
    assert lad_finetune([TINY_RECIPE, f"output_dir={read_only / 'run'}", "max_steps=2", *FAST]) == 2
    assert f"{read_only} is not writable (read-only filesystem" in capsys.readouterr().err
