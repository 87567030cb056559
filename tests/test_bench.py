"""The benchmarks' pure helpers (eval/common.py): distinct-n, the parent's answer perplexity, the results.md
splice. No timing is asserted anywhere: benchmarks measure, tests check the arithmetic."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_END, BENCH_START, splice, splice_file  # noqa: E402
from lad.quality import answer_nll, distinct_n, perplexity  # noqa: E402

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
    nll = answer_nll(denoiser, prompts, answers, batch_size=2)
    reference = make_tiny_model(seed=3)  # the same weights, never patched: the causal model by hand
    for p, a, got in zip(prompts, answers, nll):
        with torch.no_grad():
            logp = reference(torch.tensor([p + a])).logits[0].log_softmax(-1)
        want = -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
        assert got == pytest.approx(want, abs=1e-4)
    assert perplexity(nll, [2, 4]) == pytest.approx(math.exp(sum(nll) / 6))
    assert answer_nll(denoiser, [[1, 2]], [[]]) == [0.0]
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


def quality_record(date: str) -> dict:
    row = {"parent_ppl": 3.5, "distinct_2": 0.4, "s_per_prompt": 1.25}
    return {"date": date, "command": "python -m eval.gen_quality --iters 8 16", "model": "runs/x",
            "versions": {"lad": "0", "torch": "2", "transformers": "5", "peft": "0", "python": "3"},
            "machine": {"platform": "Linux", "cpus": 2, "memory_gib": 24, "threads": 2, "gpu": None},
            "settings": {"prompts": 16, "max_new_tokens": 64, "iters": [8, 16]}, "prompt_source": "builtin",
            "ar": {"parent_ppl": 1.9, "distinct_2": 0.7, "s_per_prompt": 0.5},
            "sweep": {"confidence": [row, {**row, "parent_ppl": 2.5}]}}


def test_bench_report_reads_the_parts_an_earlier_run_left(tmp_path):
    """`--only PART` and `--report` build the section from every saved record: the suite can be spread over
    sessions, and a part rerun now replaces its saved record."""
    import json

    from eval.bench import OUTPUTS, saved_records, section

    (tmp_path / OUTPUTS["quality"]).write_text(json.dumps(quality_record("2026-12-04T10:00:00")))
    assert saved_records(tmp_path, skip={}) == {"quality": quality_record("2026-12-04T10:00:00")}
    assert saved_records(tmp_path, skip={"quality": {}}) == {}  # rerun this time: the new record wins
    text = section(saved_records(tmp_path, skip={}), "python -m eval.bench --report", quick=False)
    assert text.startswith("Measured 2026-12-04 on Linux (")
    later = {**quality_record("2026-12-05T10:00:00"), "machine": {**quality_record("")["machine"], "platform": "Mac"},
             "settings": {"tasks": ["arc_easy"], "limit": 2}, "results": {}, "peak_rss_mb": 100}  # a scoring part
    both = section({"quality": quality_record("2026-12-04T10:00:00"), "scoring": later}, "x", quick=False)
    assert both.startswith("Measured 2026-12-04 and 2026-12-05 on Linux and Mac (")  # each part's own host
    assert "| confidence (ppl / distinct-2 / s per prompt) | 3.5 / 0.40 / 1.25 | 2.5 / 0.40 / 1.25 |" in text
    assert "`eval/results/{gen_quality.json}`" in text


def test_conversion_curve_starts_from_the_untrained_record_only_when_it_is_the_same_model(tmp_path, monkeypatch):
    """LoRA starts at zero, so the untrained prompt-causal + shift model is step 0 of any such run; a run with
    another attention, or a record for another document count, gets no step-0 point."""
    import json

    import eval.conversion as conversion

    monkeypatch.setattr(conversion, "STEP0", tmp_path)
    monkeypatch.setattr(conversion, "REPO", tmp_path)
    (tmp_path / "step0_shift_pc_l2r.json").write_text(json.dumps(
        {"results": {"arc_easy": {"acc,none": 0.44, "acc_stderr,none": 0.035, "acc_norm,none": 0.305,
                                  "acc_norm_stderr,none": 0.033}},
         "config": {"limit": 200, "order": "l2r", "iters": 16}}))
    train = {"recipe": "shift: true\nattention: prompt_causal\n"}
    point = conversion.untrained_point(train, "arc_easy", "l2r", 200)
    assert point["step"] == 0 and point["tokens"] == 0 and point["acc"] == 0.44 and point["acc_norm"] == 0.305
    assert conversion.untrained_point(train, "arc_easy", "l2r", 100) is None  # another document count
    assert conversion.untrained_point(train, "arc_easy", "confidence", 200) is None  # no record for that order
    assert conversion.untrained_point(train, "hellaswag", "l2r", 200) is None
    assert conversion.untrained_point({"recipe": "shift: true\nattention: bidirectional\n"}, "arc_easy", "l2r",
                                      200) is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_reset_peak_rss_separates_the_loading_peak_from_the_work():
    """The benchmarks report the peak of the work after loading: a 200 MB buffer freed before the reset counts in
    the returned (loading) peak, not in the peak measured afterwards."""
    from eval.common import peak_rss_mb, reset_peak_rss, rss_mb

    start = rss_mb()
    buffer = torch.ones(50_000_000)  # 200 MB, touched
    del buffer
    before = reset_peak_rss()
    assert before >= start + 190  # the freed buffer is in the loading peak (the kernel's high-water mark) …
    assert peak_rss_mb() < before - 150  # … and not in the peak that starts after the reset


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_child_process_reports_its_own_peak_not_its_parents(tmp_path):
    """ru_maxrss starts a child at its parent's peak (carried over at exec); the benchmarks run each arm in a
    child to measure it alone, so `peak_rss_mb` must read the child's own high-water mark."""
    import subprocess

    from eval.common import peak_rss_mb

    buffer = torch.ones(100_000_000)  # 400 MB, touched: the parent's peak is at least that
    parent = peak_rss_mb()
    del buffer
    code = "import sys; sys.path.insert(0, sys.argv[1]); from eval.common import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.check_output([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1])],
                                          text=True).strip())
    assert parent >= 400 and child < parent - 200


def test_generation_bench_settings_parse_as_written():
    from eval.bench_generation import overlap, parse_setting

    assert parse_setting("threshold:threshold=0.7,iters=N,carry=false", 128) == \
        ("threshold", {"threshold": 0.7, "iters": 128, "carry": False})
    assert parse_setting("confidence:iters=N/4", 64) == ("confidence", {"iters": 16})
    assert parse_setting("ar", 64) == ("ar", {})
    # every sampler flag and integer option parses by its own type (lad/sampling/options.py)
    assert parse_setting("confidence:iters=N/2,delay_repeats=true,stop_at_eos=0", 64) == \
        ("confidence", {"iters": 32, "delay_repeats": True, "stop_at_eos": False})
    assert parse_setting("speculative:draft_length=4,adaptive=on,max_draft=8", 64) == \
        ("speculative", {"draft_length": 4, "adaptive": True, "max_draft": 8})
    assert parse_setting("refine:schedule=linear,polish=2,polish_with=both", 64) == \
        ("refine", {"schedule": "linear", "polish": 2, "polish_with": "both"})
    assert overlap([1, 2, 3], [1, 5, 3, 4]) == 0.5 and overlap([], []) == 1.0


def test_generation_bench_runs_end_to_end_on_a_tiny_block_causal_run(tmp_path):
    from conftest import train_tiny
    from eval.bench_generation import main

    run = train_tiny(tmp_path / "run", "attention=block_causal", "block_size=4", "shift=true", "noise.objective=mask",
                     "max_steps=2", "eval_every=0", "save_every=0")
    out = tmp_path / "bench.json"
    assert main(["--runs", str(run), "--prompts", "2", "--max-new-tokens", "8", "--batch-sizes", "1", "2",
                 "--settings", "confidence:iters=N/2", "threshold:threshold=0.5,iters=N,carry=false",
                 "confidence:iters=N/2,merged=true", "confidence:iters=N/2,polish=1,polish_keep=0.5", "--out", str(out),
                 "--plot", str(tmp_path / "front.png")]) == 0
    rows = json.loads(out.read_text())["rows"]
    settings = ("ar", "confidence:iters=N/2", "threshold:threshold=0.5,iters=N,carry=false",
                "confidence:iters=N/2,merged=true", "confidence:iters=N/2,polish=1,polish_keep=0.5")
    assert [(r["setting"], r["batch_size"]) for r in rows] == [(s, b) for b in (1, 2) for s in settings]
    for b in (1, 2):  # the merged adapter answers as the adapter does (fp32: the same greedy tokens)
        plain, merged = (next(r for r in rows if r["setting"] == s and r["batch_size"] == b)
                         for s in (settings[1], settings[3]))
        assert merged["parent_ppl"] == pytest.approx(plain["parent_ppl"], rel=1e-4)
        assert merged["tokens_per_forward"] == plain["tokens_per_forward"]
        polished = next(r for r in rows if r["setting"] == settings[4] and r["batch_size"] == b)
        assert polished["tokens_per_forward"] < plain["tokens_per_forward"]  # the pass's forward is counted
    ar = [r for r in rows if r["setting"] == "ar"]
    assert all(r["ppl_ratio"] == pytest.approx(1.0) and r["overlap_with_ar"] == 1.0 for r in ar)
    half = next(r for r in rows if r["setting"] == "confidence:iters=N/2" and r["batch_size"] == 1)
    assert half["tokens_per_forward"] > 1.5  # two commits per forward, fewer only past EOS
    assert (tmp_path / "front.png").stat().st_size > 1000


def test_adapter_merged_folds_the_lora_in_and_takes_it_out_again(tmp_path):
    import torch
    from conftest import train_tiny

    from eval.bench_generation import adapter_merged, main
    from eval.common import load_denoiser

    run = train_tiny(tmp_path / "run", "max_steps=1", "eval_every=0", "save_every=0")
    denoiser = load_denoiser(str(run))[0]
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    layers = [m for m in denoiser.model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    torch.manual_seed(0)
    with torch.no_grad():
        for m in layers:  # an adapter far from zero, as after a real conversion
            m.lora_B["default"].weight.normal_(0, 0.05)
        before, parent = denoiser.model(input_ids=ids).logits, denoiser.parent_logits(ids)
        with adapter_merged(denoiser, True):
            assert layers and all(m.merged for m in layers)
            inside = denoiser.model(input_ids=ids).logits
        assert not any(m.merged for m in layers)
        after, parent_after = denoiser.model(input_ids=ids).logits, denoiser.parent_logits(ids)
    assert (before - parent).abs().max() > 1e-3  # the adapter changes the logits, so the test can see it
    torch.testing.assert_close(inside, before, atol=1e-4, rtol=1e-4)  # fp32 rounding of W + BA
    assert torch.equal(after, before) and torch.equal(parent_after, parent)  # the weights put back bit for bit
    with pytest.raises(SystemExit, match="merged=true is for the diffusion samplers"):
        main(["--runs", str(run), "--prompts", "1", "--max-new-tokens", "4", "--batch-sizes", "1",
              "--settings", "speculative:draft_length=2,merged=true", "--out", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="merged=true cannot polish with the parent"):
        main(["--runs", str(run), "--prompts", "1", "--max-new-tokens", "4", "--batch-sizes", "1",
              "--settings", "confidence:merged=true,polish=1,polish_with=both", "--out", str(tmp_path / "c.json")])


def test_speculative_bench_asserts_identity_reports_acceptance_and_draft_slots(tmp_path):
    """The speculative rows of eval.bench_generation (identical to the parent, acceptance reported), the table and
    plot of eval.speculative_report and eval.draft_slots, on a tiny gated block-causal run."""
    from conftest import train_tiny
    from eval.bench_generation import main as bench
    from eval.draft_slots import main as slots
    from eval.speculative_report import main as report

    run = train_tiny(tmp_path / "run", "attention=block_causal", "block_size=4", "shift=true", "lora.gate=masked",
                     "noise.objective=mask", "max_steps=2", "eval_every=0", "save_every=0")
    out = tmp_path / "bench.json"
    assert bench(["--runs", str(run), "--prompts", "2", "--max-new-tokens", "8", "--batch-sizes", "1", "2",
                  "--settings", "speculative:draft_length=3", "speculative:draft_length=2,adaptive=true",
                  "--out", str(out)]) == 0  # 1 would mean an answer left the parent's
    rows = [r for r in json.loads(out.read_text())["rows"] if r["setting"] != "ar"]
    assert len(rows) == 4 and all(r["identical_to_ar"] == 1 and r["divergences"] == [] for r in rows)
    assert all(r["gated"] and r["mean_accepted"] >= 0 and r["rounds"] >= 1 for r in rows)
    assert report([str(out), "--plot", str(tmp_path / "acceptance.png")]) == 0
    assert (tmp_path / "acceptance.png").stat().st_size > 1000
    assert slots(["--runs", str(run), "--prompts", "2", "--slots", "3", "--cuts", "1", "6", "2",
                  "--out", str(tmp_path / "slots.json")]) == 0
    (row,) = json.loads((tmp_path / "slots.json").read_text())["rows"]
    assert row["gated"] and len(row["agreement"]) == 3 and row["agreement"][0] == 1.0  # slot 0: the parent's own


def test_forward_cost_bench_times_each_width_with_the_adapter_off_and_on(tmp_path):
    from conftest import train_tiny
    from eval.bench_forward_cost import main

    run = train_tiny(tmp_path / "run", "attention=block_causal", "block_size=4", "shift=true", "noise.objective=mask",
                     "max_steps=1", "eval_every=0", "save_every=0", "lora.gate=masked")
    out = tmp_path / "cost.json"
    assert main(["--run", str(run), "--widths", "1", "4", "--context", "6", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["columns"], r["adapter"]) for r in rows] == [(1, False), (1, True), (4, False), (4, True)]
    assert rows[0]["decode_steps"] == 1.0  # every cost is in units of the parent's one-column forward
    assert all(r["tokens_for_2x"] == pytest.approx(2 * r["decode_steps"], abs=0.02) and r["ms"] > 0 for r in rows)
    with pytest.raises(SystemExit) as stop:
        main(["--run", str(run), "--widths", "0"])
    assert stop.value.code == 2
