"""Fuzz the CLIs (hypothesis): recipes and overrides, data rows, and argument lists, valid and invalid, against
the tiny model. Whatever comes in, the tool exits 0 or 2 — never a traceback, never 1 — an exit 2 prints exactly
one `PROG: error: ...` line, and after an exit 2 the workspace is byte-for-byte what it was.

Bounded for CI (a fixed number of examples, derandomized so every CI run tries the same inputs); set
LAD_FUZZ_EXAMPLES=N and LAD_FUZZ_RANDOM=1 to search longer and wider by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import FAST, TINY_RECIPE, train_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lad.evaluation import main as lad_eval
from lad.export import main as lad_export
from lad.finetune import main as lad_finetune
from lad.generate import main as lad_generate

EXAMPLES = int(os.environ.get("LAD_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("LAD_FUZZ_RANDOM"),
                database=None, suppress_health_check=list(HealthCheck))
SAFE_TAIL = ["max_steps=1", "eval_every=0", "save_every=0", "report_to=[]"]  # every run stays a one-step run


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    train_tiny(root / "run", "max_steps=2", *FAST)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("keep me")
    (root / "a_file").write_text("not a folder")
    for name in ("cwd", "home"):  # `.` and `~` in a fuzzed path land here, inside the checked workspace
        (root / name).mkdir()
        (root / name / "mine.txt").write_text("keep me")
    return root


def outcome(tool, argv: list[str], ws: Path, capsys, fresh: Path | None = None) -> None:
    """Run one CLI in-process and check the invariants (`fresh`: an output path that must not appear on exit 2)."""
    capsys.readouterr()
    before = tree(ws)
    try:
        code = tool(argv)
    except SystemExit as done:  # argparse's own exits (--help, usage errors)
        code = done.code if isinstance(done.code, int) else 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code in (0, 2), f"exit {code} for {argv}: {err[-1500:]}"
    if code == 2:
        errors = [line for line in err.splitlines() if ": error:" in line]
        assert len(errors) == 1, f"{argv}: {err[-1500:]}"
        assert tree(ws) == before, f"{argv} changed the workspace"
        assert fresh is None or not fresh.exists(), f"{argv} wrote {fresh} and then failed"


# ---------------------------------------------------------------- recipes and overrides

KEYS = ["batch_size", "grad_accum", "seed", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
        "noise.objective", "noise.t_min", "noise.replace_rate", "noise.swap_rate", "noise.suffix_share",
        "noise.full_mask_share", "optim.lr", "optim.warmup_steps", "optim.scheduler", "optim.grad_clip",
        "optim.betas", "data.max_length", "data.truncation", "data.val_fraction", "data.val_max_examples",
        "data.train.0.max_rows", "data.train.0.format", "data.chat_template", "mask_token", "shift", "attention",
        "distill_weight", "anneal_steps", "eos_padding", "precision", "skip_bad_steps", "keep_checkpoints",
        "log_every", "epochs", "overwrite", "resume_from", "output_dir", "model.config.hidden_size",
        "model.config.num_attention_heads", "batch_sise", "noise.objectiv", "lora", "model"]
VALUES = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 10**12, -1]),
                   st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from(["", "true", "false", "null", "[]", "{}", "[1, 2]", "{a: 1}", "mask", "structural",
                                    "prompt_causal", "bidirectional", "cosine", "drop", "left", "bf16", "latest",
                                    "all-linear", "[q_proj]", "&a [*a]", "{x: 1, x: 2}", "~", ".", "notes",
                                    "a_file/x", "<|eos|>", "ünïcode", "1e-3", "nan", ".inf"]),
                   st.text(max_size=8))


def value_text(value) -> str:
    return json.dumps(value) if isinstance(value, float) else str(value)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_fuzzed_overrides_exit_0_or_2_cleanly(ws, capsys, tmp_path_factory, monkeypatch, pairs):
    monkeypatch.chdir(ws / "cwd")
    monkeypatch.setenv("HOME", str(ws / "home"))
    out = tmp_path_factory.mktemp("out") / "run"
    overrides = [f"{k}={value_text(v)}" for k, v in pairs]
    # output_dir / resume_from / overwrite as generated may point into the workspace; the safe tail only bounds cost
    relative = [o.replace("=notes", f"={ws / 'notes'}").replace("=a_file", f"={ws / 'a_file'}") for o in overrides]
    outcome(lad_finetune, [TINY_RECIPE, f"output_dir={out}", *relative, *SAFE_TAIL], ws, capsys, fresh=out)


# ---------------------------------------------------------------- data rows

ROW_VALUE = st.one_of(st.text(max_size=30), st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3),
                                                                                                 max_size=2))
ROW = st.dictionaries(st.sampled_from(["instruction", "input", "output", "response", "text", "prompt"]), ROW_VALUE,
                      max_size=4)


@FUZZ
@given(st.lists(st.one_of(ROW.map(json.dumps), st.text(max_size=20)), min_size=0, max_size=40))
def test_fuzzed_data_rows_exit_0_or_2_cleanly(ws, capsys, tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("data")
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    outcome(lad_finetune, [TINY_RECIPE, f"output_dir={folder / 'run'}", f"data.train.0.path={folder / 'rows.jsonl'}",
                           "batch_size=2", "data.val_fraction=0", *SAFE_TAIL], ws, capsys, fresh=folder / "run")


# ---------------------------------------------------------------- argument lists

NUMBER = st.sampled_from(["0", "1", "2", "-1", "3.5", "x", "", "1e9", "nan", "inf"])
GENERATE_FLAGS = {"--iters": st.sampled_from(["1", "2", "4", "0", "-2", "x", "2.5"]),
                  "--max-new-tokens": st.sampled_from(["1", "4", "8", "0", "-1", "x"]),
                  "--strategy": st.sampled_from(["confidence", "refine", "threshold", "ar", "beam", ""]),
                  "--temperature": NUMBER, "--top-k": NUMBER, "--top-p": NUMBER, "--seed": NUMBER,
                  "--noise-start": NUMBER, "--block-length": NUMBER, "--threshold": NUMBER, "--early-stop": NUMBER,
                  "--batch-size": NUMBER, "--weights": st.sampled_from(["final", "best", "nowhere", ""]),
                  "--schedule": st.sampled_from(["linear", "cubic"]), "--retention": st.sampled_from(["none", "x"]),
                  "--device": st.sampled_from(["cpu", "cuda:7", "tpu", ""]), "--bogus": st.just("1")}
SWITCHES = ["--delay-eos", "--prefix-cache", "--no-prefix-cache", "--block-cache", "--json"]


def arg_lists(flags: dict, switches: list[str]):
    pairs = st.lists(st.sampled_from(sorted(flags)).flatmap(lambda f: st.tuples(st.just(f), flags[f])), max_size=4)
    return st.tuples(pairs, st.lists(st.sampled_from(switches), max_size=2, unique=True))


@FUZZ
@given(arg_lists(GENERATE_FLAGS, SWITCHES))
def test_fuzzed_generate_arguments_exit_0_or_2_cleanly(ws, capsys, args):
    pairs, switches = args
    argv = ["--model", str(ws / "run"), "--prompt", "hi", "--iters", "2", "--max-new-tokens", "4"]
    argv += [item for pair in pairs for item in pair] + switches
    outcome(lad_generate, argv, ws, capsys)


EXPORT_FLAGS = {"--out": st.sampled_from(["", "notes", "a_file", "a_file/x", "run", "run/base", "run/best", "."]),
                "--dtype": st.sampled_from(["auto", "fp32", "bf16", "fp8", ""]),
                "--weights": st.sampled_from(["final", "best", "checkpoints/step-000002", "nowhere"])}


@FUZZ
@given(arg_lists(EXPORT_FLAGS, ["--overwrite"]))
def test_fuzzed_export_arguments_exit_0_or_2_cleanly(ws, capsys, tmp_path_factory, monkeypatch, args):
    pairs, switches = args
    monkeypatch.chdir(ws)  # relative --out values name the workspace's folders
    out = str(tmp_path_factory.mktemp("export") / "model")
    argv = [str(ws / "run"), "--out", out] + [item for pair in pairs for item in pair] + switches
    outcome(lad_export, argv, ws, capsys, fresh=Path(out))


EVAL_FLAGS = {"--tasks": st.sampled_from(["arc_eazy", "", ",", "nope"]), "--iters": NUMBER,
              "--limit": NUMBER, "--num_fewshot": NUMBER, "--batch_size": NUMBER, "--mc-samples": NUMBER,
              "--output_path": st.sampled_from(["", "a_file/x", "notes"]), "--score": st.sampled_from(["elbo", "x"])}


@FUZZ
@given(arg_lists(EVAL_FLAGS, ["--compare", "--log_samples"]))
def test_fuzzed_eval_arguments_with_an_unknown_task_exit_2_cleanly(ws, capsys, args):
    """Every list names no real task (a real evaluation costs minutes): whatever else is wrong, one line, exit 2."""
    pairs, switches = args
    argv = ["--model", str(ws / "run"), "--tasks", "no_such_task"] + [i for p in pairs for i in p] + switches
    outcome(lad_eval, argv, ws, capsys)
