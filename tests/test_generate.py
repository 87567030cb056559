"""`lad-generate` and the generation API on a tiny trained run: JSON trace, terminal view, batches, errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lad.console import printable
from lad.generate import generate, load, main
from lad.generate_cli import read_prompts
from lad.sampling import Step
from lad.sampling.render import MASK_GLYPH, LiveView, count_lines, display_width, render_step, visible

REPO = Path(__file__).resolve().parents[1]
RED, GREEN = "\x1b[31m", "\x1b[32m"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lad.finetune import main as finetune

    out = tmp_path_factory.mktemp("gen") / "run"
    code = finetune([str(REPO / "recipes" / "tiny.yaml"), "max_steps=20", f"output_dir={out}", "eval_every=0",
                     "save_every=0"])
    assert code == 0
    return str(out)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- CLI


def test_json_trace_in_subprocess(run_dir):
    """stdout holds only the JSON (library chatter goes to stderr); refine spends one forward per step."""
    proc = subprocess.run([sys.executable, "-m", "lad.generate", "--model", run_dir, "--prompt", "What is 2+2?",
                           "--iters", "6", "--max-new-tokens", "12", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    (record,) = json_lines(proc.stdout)
    assert record["prompt"] == "What is 2+2?" and record["strategy"] == "refine"
    assert 1 <= record["nfe"] <= 6 and len(record["steps"]) == record["nfe"]
    assert [s["nfe"] for s in record["steps"]] == list(range(1, record["nfe"] + 1))
    for step in record["steps"]:
        assert len(step["tokens"]) == len(step["pieces"]) == len(step["masked"]) == len(step["confidence"]) == 12
        assert all((piece is None) == masked for piece, masked in zip(step["pieces"], step["masked"]))
    assert not any(record["steps"][-1]["masked"])  # the last refine step re-masks nothing
    assert record["token_ids"] == record["steps"][-1]["tokens"][:len(record["token_ids"])]
    assert isinstance(record["text"], str) and record["seconds"] >= 0


def test_show_prints_colours_then_the_final_answer(run_dir, capsys):
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "What is 2+2?", "--iters", "5",
                       "--max-new-tokens", "10", "--show", "--color", "always")
    assert code == 0
    (gen,) = generate(run_dir, "What is 2+2?", iters=5, max_new_tokens=10)
    assert RED in out and GREEN in out  # masks after step 1, changes every step
    assert "step 1/5" in out and "\x1b[" not in out.split("\n\n")[-1]  # the answer is printed plain, last
    assert out.endswith(printable(gen.text) + "\n")  # control characters made visible
    assert out.count("step ") == gen.nfe  # not a terminal: one line per step, no cursor movement
    assert "\x1b[J" not in out


def test_show_without_colour_has_no_ansi(run_dir, capsys):
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "hi", "--iters", "3", "--max-new-tokens", "6",
                       "--show", "--no-redraw")
    assert code == 0 and "\x1b" not in out and out.count("step ") == 3  # --color auto: not a terminal


def test_python_api_matches_cli(run_dir, capsys):
    args = dict(iters=4, max_new_tokens=10, seed=7, temperature=1.0, top_k=20)
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "Name a colour.", "--json", "--iters", "4",
                       "--max-new-tokens", "10", "--seed", "7", "--temperature", "1.0", "--top-k", "20")
    assert code == 0
    (record,) = json_lines(out)
    (from_path,) = generate(run_dir, "Name a colour.", **args)
    denoiser, tokenizer = load(run_dir)
    (from_denoiser,) = generate(denoiser, ["Name a colour."], tokenizer=tokenizer, **args)
    assert record["token_ids"] == from_path.token_ids == from_denoiser.token_ids
    (other_seed,) = generate(denoiser, ["Name a colour."], tokenizer=tokenizer, **{**args, "seed": 8})
    assert other_seed.token_ids != from_path.token_ids  # the seed reaches the sampler


def test_several_prompts_and_prompts_file(run_dir, capsys, tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("first question\n\nsecond question\n", encoding="utf-8")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "third"}\n{"prompt": "fourth", "id": 4}\n', encoding="utf-8")
    assert read_prompts(str(plain)) == ["first question", "second question"]
    assert read_prompts(str(rows)) == ["third", "fourth"]
    common = ["--model", run_dir, "--iters", "3", "--max-new-tokens", "6", "--json"]
    code, out, _ = cli(capsys, *common, "--prompt", "zero", "--prompts-file", str(plain), "--batch-size", "2")
    assert code == 0
    records = json_lines(out)
    assert [r["prompt"] for r in records] == ["zero", "first question", "second question"]
    # each prompt's answer is the same alone or in a batch (left padding is exact, generators are per row)
    code, out, _ = cli(capsys, *common, "--prompts-file", str(rows), "--prompt", "zero", "--batch-size", "1")
    singles = {r["prompt"]: r["token_ids"] for r in json_lines(out)}
    assert singles["zero"] == records[0]["token_ids"]
    code, out, _ = cli(capsys, "--model", run_dir, "--iters", "3", "--max-new-tokens", "6",
                       "--prompt", "a", "--prompt", "b")
    assert code == 0 and out.startswith("[1] a\n") and "\n[2] b\n" in out


def test_ar_prints_both_answers(run_dir, capsys):
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "What is 2+2?", "--iters", "3",
                       "--max-new-tokens", "6", "--ar")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("lad (refine, 3 forwards, ") and lines[1].startswith("ar  (parent, ")
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "x", "--iters", "3", "--max-new-tokens", "6",
                       "--ar", "--json")
    (record,) = json_lines(out)
    assert record["ar"]["strategy"] == "ar" and "steps" not in record["ar"] and record["ar"]["nfe"] >= 1


def test_answers_never_write_raw_control_characters_and_noise_is_labelled(run_dir, capsys):
    """A byte-level model writes any byte: the terminal gets visible stand-ins (line breaks kept), and a model
    this small is said to answer with noise, on stderr, where a script reading stdout does not see it."""
    prompts = ["What is the capital of France?", "Name a colour.", "What is 2+2?"]
    argv = ["--model", run_dir, "--iters", "4", "--max-new-tokens", "48", "--ar"]
    code, out, err = cli(capsys, *argv, *(arg for p in prompts for arg in ("--prompt", p)))
    assert code == 0
    raw = sorted({hex(ord(ch)) for ch in out if (ord(ch) < 0x20 and ch != "\n") or 0x7f <= ord(ch) < 0xa0})
    assert not raw, raw
    assert err.splitlines() == ["lad-generate: note: a 140,864-parameter model answers with noise: it shows the "
                                "pipeline working, not language (docs/scratch.md trains a small model that writes "
                                "words)"]


@pytest.mark.parametrize("strategy", ["confidence", "threshold", "ar"])
def test_other_strategies_run(run_dir, capsys, strategy):
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "hi", "--strategy", strategy, "--iters", "4",
                       "--max-new-tokens", "8", "--json")
    (record,) = json_lines(out)
    assert code == 0 and record["strategy"] == strategy and len(record["steps"]) == record["nfe"]


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_no_stop_at_eos_spends_the_whole_canvas(run_dir, capsys, strategy):
    """--no-stop-at-eos reaches the sampler: every slot is committed; by default the text is the same."""
    argv = ["--model", run_dir, "--prompt", "hi", "--strategy", strategy, "--iters", "8", "--max-new-tokens", "8",
            "--block-length", "2", "--threshold", "1.01", "--json"]
    records = {}
    for flag in ("--stop-at-eos", "--no-stop-at-eos"):
        code, out, _ = cli(capsys, *argv, flag)
        (records[flag],) = json_lines(out)
        assert code == 0
    full, early = records["--no-stop-at-eos"], records["--stop-at-eos"]
    assert full["nfe"] == 8 and not any(full["steps"][-1]["masked"]) and early["nfe"] <= 8
    assert early["token_ids"] == full["token_ids"] and early["steps"] == full["steps"][:early["nfe"]]


def test_unused_option_is_noted(run_dir, capsys):
    code, _, err = cli(capsys, "--model", run_dir, "--prompt", "hi", "--iters", "2", "--max-new-tokens", "4",
                       "--block-length", "2")
    assert code == 0 and "strategy 'refine' does not use --block-length" in err


# ---------------------------------------------------------------- errors: one line, exit 2


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lad-generate: error: ")
    return lines[0]


def test_not_a_run_dir(tmp_path, capsys):
    code, out, err = cli(capsys, "--model", str(tmp_path), "--prompt", "x")
    assert code == 2 and out == "" and "is not a LAD run" in one_error_line(err)


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read --prompts-file"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a GPU is present")),
])
def test_bad_options(tmp_path, capsys, argv, message):
    code, _, err = cli(capsys, "--model", str(tmp_path), "--prompt", "x", *argv)
    assert code == 2 and message in one_error_line(err)  # checked before anything loads


def test_bad_jsonl_row_and_bad_strategy_option(run_dir, tmp_path, capsys):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "ok"}\n{"question": "no"}\n', encoding="utf-8")
    code, _, err = cli(capsys, "--model", run_dir, "--prompts-file", str(rows))
    assert code == 2 and "p.jsonl:2: needs a string field 'prompt'" in one_error_line(err)
    code, _, err = cli(capsys, "--model", run_dir, "--prompt", "x", "--noise-start", "2")
    assert code == 2 and "--noise-start must be in [0, 1], got 2.0" in one_error_line(err)  # named as typed


def test_unknown_strategy_and_missing_prompt(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path), "--prompt", "x", "--strategy", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in one_error_line(capsys.readouterr().err)
    code, _, err = cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "--prompt" in one_error_line(err)


def test_lad_cli_has_generate(capsys):
    from lad.cli import main as lad_main

    with pytest.raises(SystemExit) as exc:
        lad_main(["generate", "--help"])
    assert exc.value.code == 0 and "--strategy" in capsys.readouterr().out


# ---------------------------------------------------------------- render.py


def test_render_step_exact(byte_tokenizer):
    step = Step(iteration=2, tokens=[72, 105, 262, 257, 33], masked=[False, False, True, False, False],
                changed=[False, True, False, False, True], confidence=[0.5] * 5, nfe=3)
    assert render_step(step, byte_tokenizer, 262) == (
        "H" + "\x1b[32mi\x1b[0m" + f"\x1b[31m{MASK_GLYPH}\x1b[0m" + "\x1b[2m<|eos|>\x1b[0m" + "\x1b[2;32m!\x1b[0m")
    assert render_step(step, byte_tokenizer, 262, color=False) == f"Hi{MASK_GLYPH}"  # EOS and after hidden
    controls = Step(0, [10, 8, 27, 65], [False] * 4, [False] * 4, [0.0] * 4, 1)
    assert render_step(controls, byte_tokenizer, 262, color=False) == "↵␈␛A"  # never raw control bytes


def test_visible_and_widths():
    assert visible("a\tb\x7f") == "a␉b␡"
    assert display_width("\x1b[31mab\x1b[0m") == 2 and display_width("日本") == 4
    assert count_lines("abcde", 5) == 1 and count_lines("abcdef", 5) == 2 and count_lines("ab\n\ncd", 5) == 3
    assert count_lines("\x1b[32m" + "x" * 10 + "\x1b[0m", 4) == 3


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_live_view_redraws_in_place(byte_tokenizer):
    stream = FakeTTY()
    view = LiveView(byte_tokenizer, 262, stream=stream, color=False, iters=2)
    assert view.redraw  # a terminal: redraw by default
    first = [Step(0, [262, 262], [True, True], [False, False], [0.0, 0.0], 1),
             Step(0, [65, 262], [False, True], [True, False], [0.9, 0.0], 1)]
    view(first)
    assert stream.getvalue() == f"step 1/2 · 1 NFE\n[1] {MASK_GLYPH * 2}\n[2] A{MASK_GLYPH}\n"
    view([Step(1, [72, 105], [False] * 2, [True] * 2, [0.9] * 2, 2),
          Step(1, [65, 66], [False] * 2, [False, True], [0.9] * 2, 2)])
    assert stream.getvalue().endswith("\x1b[3F\x1b[J" + "step 2/2 · 2 NFE\n[1] Hi\n[2] AB\n")
    view.reset(["[3]"])  # next batch: a new block below, nothing erased
    view([Step(0, [67], [False], [True], [0.5], 1)])
    assert stream.getvalue().endswith("[2] AB\nstep 1/2 · 1 NFE\n[3] C\n")


def test_default_strategy_follows_the_objective(run_dir, capsys, tmp_path):
    """refine for runs trained with structural/mixed noise (the tiny recipe: mixed), confidence for mask runs."""
    from types import SimpleNamespace

    from lad.sampling import default_strategy

    from lad.run import LadInfo

    for objective, expected in (("mask", "confidence"), ("mixed", "refine"), ("structural", "refine")):
        info = LadInfo(base_model={}, mask_token="m", mask_token_id=5, mask_token_added=False, vocab_size=9,
                       shift=False, objective=objective, noise={})
        assert default_strategy(SimpleNamespace(info=info)) == info.strategy == expected
    assert default_strategy(SimpleNamespace(info=None)) == "confidence"  # no run settings: LAD's default objective
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", "hi", "--iters", "2", "--max-new-tokens", "4", "--json")
    (record,) = json_lines(out)
    assert code == 0 and record["strategy"] == "refine"
    mask_run = tmp_path / "mask_run"  # the same weights, recorded as trained on the mask objective
    shutil.copytree(run_dir, mask_run)
    info = json.loads((mask_run / "lad.json").read_text())
    (mask_run / "lad.json").write_text(json.dumps({**info, "objective": "mask",
                                                   "noise": {**info["noise"], "objective": "mask"}}))
    code, out, _ = cli(capsys, "--model", str(mask_run), "--prompt", "hi", "--iters", "2", "--max-new-tokens", "4",
                       "--json")
    (record,) = json_lines(out)
    assert code == 0 and record["strategy"] == "confidence"
