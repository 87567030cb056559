"""`lad-eval` end to end on a tiny run with local fixture data (the stock task configs, offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lad.evaluation import main as lad_eval
from lad.finetune import main as finetune

REPO = Path(__file__).resolve().parents[1]
ARC = [{"id": f"q{i}", "question": f"Which number is {i}?", "choices": {"text": [str(i), str(i + 1), str(i + 2)],
        "label": ["A", "B", "C"]}, "answerKey": "A"} for i in range(6)]
MMLU = [{"question": f"{i} + 1 = ?", "subject": "elementary_mathematics", "choices": [str(i + 1), "0", "x", "y"],
         "answer": 0} for i in range(4)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_run") / "run"
    assert finetune([str(REPO / "recipes" / "tiny.yaml"), f"output_dir={out}", "max_steps=10", "eval_every=0",
                     "save_every=0"]) == 0
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    for folder, name, rows in (("arc_easy", "validation.jsonl", ARC), ("mmlu", "validation.jsonl", MMLU),
                               ("mmlu", "dev.jsonl", MMLU)):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAD_CACHE", str(tmp_path / "cache"))


def results(folder: Path) -> dict:
    [path] = list(folder.glob("results_*.json"))
    return json.loads(path.read_text())


def test_compare_runs_both_models_and_writes_results(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = lad_eval(["--model", str(run_dir), "--tasks", "arc_easy,mmlu", "--data-dir", str(data_dir), "--limit", "4",
                     "--iters", "4", "--compare", "--output_path", str(out), "--log_samples"])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    # only LAD's own bars: none of lm-eval's per-task request bars (unnamed) or its tokenizing bar
    bars = [line for line in re.split(r"[\r\n]", captured.err) if "%|" in line]
    assert bars and all(line.lstrip().startswith(("lad denoise", "ar ", "lad ar")) for line in bars), bars[:5]
    assert ("| task | metric | lad (denoise, l2r order, 4 iters) | ar (AR parent) | Δ (paired 95% interval, McNemar p, "
            "documents) |") in printed and "| arc_easy | acc_norm |" in printed
    data = results(out)
    assert set(data) == {"lad", "ar", "paired"}
    paired = data["paired"]["arc_easy/acc"]  # the same 4 documents, paired
    assert paired["n"] == 4 and paired["low"] <= paired["delta"] <= paired["high"] and 0 < paired["p"] <= 1
    assert "(n=4) |" in printed and data["paired"]["mmlu/acc"]["n"] >= 4  # the group pools its subjects
    lad, ar = data["lad"]["config"], data["ar"]["config"]
    assert lad["iters"] == 4 and lad["score"] == "denoise" and lad["baseline"] == "none" and ar["baseline"] == "ar"
    # NFE: with the byte tokenizer every answer (" 0", " A") is 2 tokens: ≤ min(iters, L) forwards each for LAD,
    # one each for AR (one-token answers sharing a forward is tested in test_scoring.py)
    n_arc, n_mmlu = 4 * 3, 4 * 4
    assert ar["nfe"] == n_arc + n_mmlu
    assert n_arc + n_mmlu <= lad["nfe"] <= 4 * n_arc + n_mmlu
    assert 0.0 <= data["lad"]["results"]["arc_easy"]["acc,none"] <= 1.0
    assert list(out.glob("samples_lad_arc_easy_*.jsonl")) and list(out.glob("results_*.md"))


def test_elbo_mode_and_determinism(run_dir, data_dir, tmp_path):
    scores = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert lad_eval(["--model", str(run_dir), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "3",
                         "--score", "elbo", "--mc-samples", "4", "--output_path", str(out), "--log_samples"]) == 0
        data = results(out)["lad"]
        assert data["config"]["score"] == "elbo" and data["config"]["mc_samples"] == 4
        samples = [json.loads(line) for line in next(out.glob("samples_lad_arc_easy_*.jsonl")).read_text().splitlines()]
        scores.append([s["filtered_resps"] for s in samples])
    assert scores[0] == scores[1]


def test_prefix_cache_flag_reaches_the_scorer_and_is_recorded(run_dir, data_dir, tmp_path):
    """The tiny run is bidirectional: the cache is off by default and, asked for, changes the (approximate)
    log-likelihoods; the config says which produced the numbers."""
    logged = {}
    for flag in ("--no-prefix-cache", "--prefix-cache"):
        out = tmp_path / flag
        assert lad_eval(["--model", str(run_dir), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "3",
                         "--iters", "2", "--output_path", str(out), "--log_samples", flag]) == 0
        data = results(out)["lad"]
        assert data["config"]["prefix_cache"] is (flag == "--prefix-cache")
        assert data["config"]["iters"] == 2
        samples = next(out.glob("samples_lad_arc_easy_*.jsonl")).read_text().splitlines()
        logged[flag] = [json.loads(line)["filtered_resps"] for line in samples]
    assert logged["--prefix-cache"] != logged["--no-prefix-cache"]


def test_default_scores_one_token_per_step(run_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    assert lad_eval(["--model", str(run_dir), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "2",
                     "--output_path", str(out)]) == 0
    config = results(out)["lad"]["config"]
    assert config["iters"] is None and config["nfe"] == 2 * 3 * 2  # 2 documents, 3 choices of 2 tokens, 1 per step
    assert "(denoise, l2r order, one token per step)" in next(out.glob("*.md")).read_text()


def test_lookahead_reaches_the_scorer_and_is_recorded(run_dir, data_dir, tmp_path):
    """Each choice (a space and digits: several tokens) is scored with one mask after the text so far instead of
    one per remaining token: other log-likelihoods, and the config and the table say so."""
    logged = {}
    for window in (None, "1"):
        out = tmp_path / str(window)
        flags = [] if window is None else ["--lookahead", window]
        assert lad_eval(["--model", str(run_dir), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "3",
                         "--iters", "8", "--output_path", str(out), "--log_samples", *flags]) == 0
        data = results(out)["lad"]
        assert data["config"]["lookahead"] == (None if window is None else 1)
        assert data["config"]["iters"] == 8
        samples = next(out.glob("samples_lad_arc_easy_*.jsonl")).read_text().splitlines()
        logged[window] = [json.loads(line)["filtered_resps"] for line in samples]
    assert logged["1"] != logged[None]
    assert "lookahead 1" in next((tmp_path / "1").glob("*.md")).read_text()


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "arc_eazy"], "did you mean 'arc_easy'"),
    (["--tasks", "arc_easy", "--data-dir", "/nonexistent/dir"], "is not a folder"),
])
def test_user_errors_exit_2_with_one_line(run_dir, argv, message, capsys):
    assert lad_eval(["--model", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lad-eval: error:") and message in err[0]


def test_not_a_run_and_bad_iters(tmp_path, capsys):
    assert lad_eval(["--model", str(tmp_path), "--tasks", "arc_easy"]) == 2
    assert "not a LAD run" in capsys.readouterr().err
    capsys.readouterr()
    for flags, message in ((["--iters", "0"], "--iters must be >= 1"),
                           (["--lookahead", "0"], "--lookahead must be >= 1, got 0"),
                           (["--lookahead", "2", "--order", "confidence"], "needs --score denoise --order l2r")):
        with pytest.raises(SystemExit) as exit_info:
            lad_eval(["--model", str(tmp_path), "--tasks", "arc_easy", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def test_two_processes_shard_requests_and_agree(run_dir, data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): lm-eval shards the requests; the scores equal one process's."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    common = ["--model", str(run_dir), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--iters", "4"]
    single = tmp_path / "one"
    assert lad_eval([*common, "--output_path", str(single)]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    double = tmp_path / "two"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "lad.evaluation", *common,
                           "--output_path", str(double)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = results(single)["lad"], results(double)["lad"]
    assert two["config"]["processes"] == 2 and one["config"]["processes"] == 1
    for metric in ("acc,none", "acc_norm,none"):
        assert one["results"]["arc_easy"][metric] == pytest.approx(two["results"]["arc_easy"][metric], abs=1e-9)


def test_lm_eval_options_that_stay_valid(capsys):
    """lm-eval's own forms keep working: a fraction < 1 as --limit, a whole number >= 1 as a count, and
    --batch_size auto (LAD scores in fixed batches: it uses 16 and says so on stderr)."""
    from lad.evaluation import parse_args

    base = ["--model", "runs/x", "--tasks", "arc_easy"]
    assert parse_args([*base, "--limit", "0.25"]).limit == 0.25
    assert parse_args([*base, "--limit", "3"]).limit == 3
    assert parse_args([*base, "--batch_size", "8"]).batch_size == 8
    capsys.readouterr()
    for value in ("auto", "auto:4"):
        assert parse_args([*base, "--batch_size", value]).batch_size == 16
        assert capsys.readouterr().err == (f"lad-eval: note: --batch_size {value}: LAD scores in fixed batches; "
                                           "using 16\n")
