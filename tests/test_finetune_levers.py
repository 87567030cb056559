"""Training levers that keep what the parent knows (distillation, suffix masking, attention annealing) and the
handling of a non-finite loss, on the tiny recipe in-process (a few seconds each)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import lad.training.step as training_step  # `train_step` calls its forward_loss
from conftest import FAST, read_adapter as adapter, read_metrics as metrics, train_tiny as train
from lad.finetune import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
LEVERS = ["distill_weight=1.0", "noise.suffix_share=0.5", "anneal_steps=6"]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def test_levers_train_and_the_kl_to_the_parent_falls(tmp_path):
    out = train(tmp_path / "levers", "max_steps=24", "eval_every=12", "save_every=0", *LEVERS)
    steps = [m for m in metrics(out) if "kl" in m]
    assert len(steps) == 24 and all(math.isfinite(m["kl"]) and m["kl"] > 0 for m in steps)
    val = [m for m in metrics(out) if "val_kl" in m]  # deterministic validation noise: comparable over steps
    assert [m["step"] for m in val] == [0, 12, 24] and val[-1]["val_loss"] < val[0]["val_loss"]
    kls = [m["val_kl"] for m in val]
    assert kls == sorted(kls, reverse=True) and kls[-1] < 0.85 * kls[0]
    assert json.loads((out / "lad.json").read_text())["noise"]["suffix_share"] == 0.5
    recipe = (out / "recipe.yaml").read_text()
    assert "distill_weight: 1.0" in recipe and "anneal_steps: 6" in recipe


def test_each_lever_changes_training(tmp_path):
    plain = adapter(train(tmp_path / "plain", "max_steps=3", *FAST))
    for i, lever in enumerate(LEVERS):
        other = adapter(train(tmp_path / f"lever{i}", "max_steps=3", lever, *FAST))
        assert any(not torch.equal(plain[k], other[k]) for k in plain), lever


def test_levers_resume_exactly(tmp_path):
    whole = train(tmp_path / "whole", "max_steps=6", "save_every=3", "eval_every=0", *LEVERS)
    part = train(tmp_path / "part", "max_steps=6", "save_every=3", "eval_every=0", *LEVERS)
    import shutil

    for name in ("adapter_model.safetensors", "adapter_config.json", "lad.json"):
        (part / name).unlink()
    shutil.rmtree(part / "checkpoints" / "step-000006")
    train(part, "max_steps=6", "save_every=3", "eval_every=0", "resume_from=latest", *LEVERS)
    a, b = adapter(whole), adapter(part)
    assert all(torch.equal(a[k], b[k]) for k in a)  # annealing masks and noise are functions of (seed, step, row)


@needs_bnb
def test_distillation_under_qlora(tmp_path):
    base = train(tmp_path / "base_run", "max_steps=1", *FAST) / "base"
    out = train(tmp_path / "q", "max_steps=2", "model.init=pretrained", "model.config={}",
                f"model.name_or_path={base}", "model.quantization=4bit", "distill_weight=1.0", *FAST)
    kls = [m["kl"] for m in metrics(out) if "kl" in m]
    assert len(kls) == 2 and all(math.isfinite(k) and k > 0 for k in kls)


def test_recipe_checks_the_levers(capsys):
    assert main([TINY, "distill_weight=1.0", "lora.enabled=false", "--print-recipe"]) == 2
    assert "distill_weight: needs LoRA" in capsys.readouterr().err
    assert main([TINY, "anneal_steps=-1", "--print-recipe"]) == 2
    assert main([TINY, "anneal_steps=5", "model.attn_implementation=flash_attention_2", "--print-recipe"]) == 2


def test_prompt_distillation_trains_logs_its_kl_and_resumes_exactly(tmp_path):
    lever = ["attention=prompt_causal", "shift=true", "prompt_distill_weight=1.0", "distill_weight=1.0"]
    whole = train(tmp_path / "whole", "max_steps=4", "save_every=2", "eval_every=4", *lever)
    logged = [m for m in metrics(whole) if "prompt_kl" in m]
    assert len(logged) == 4 and all(math.isfinite(m["prompt_kl"]) and m["prompt_kl"] >= 0 for m in logged)
    assert [m for m in metrics(whole) if "val_prompt_kl" in m]
    plain = adapter(train(tmp_path / "plain", "max_steps=4", "save_every=2", "eval_every=4", *lever[:2],
                          "distill_weight=1.0"))
    a = adapter(whole)
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # the term changes training
    part = train(tmp_path / "part", "max_steps=4", "save_every=2", "eval_every=0", *lever)
    import shutil

    for name in ("adapter_model.safetensors", "adapter_config.json", "lad.json"):
        (part / name).unlink()
    shutil.rmtree(part / "checkpoints" / "step-000004")
    train(part, "max_steps=4", "save_every=2", "eval_every=0", "resume_from=latest", *lever)
    b = adapter(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, words", [
    (["prompt_distill_weight=1.0"], "prompt_distill_weight: needs attention prompt_causal or block_causal"),
    (["prompt_distill_weight=1.0", "attention=prompt_causal", "shift=false"], "shift false"),
    (["prompt_distill_weight=1.0", "attention=block_causal", "shift=false"], "attention is block_causal, shift false"),
    (["prompt_distill_weight=1.0", "attention=prompt_causal", "shift=true", "lora.gate=masked"],
     "prompt_distill_weight: a mask-gated adapter leaves the prompt's columns exactly the parent's already"),
    (["prompt_distill_weight=1.0", "attention=prompt_causal", "shift=true", "lora.enabled=false"],
     "prompt_distill_weight: needs LoRA"),
    (["prompt_distill_weight=-1"], "prompt_distill_weight: must be"),
])
def test_recipe_refuses_prompt_distillation_where_the_parent_is_not_its_target(overrides, words, capsys):
    assert main([TINY, *overrides, "--print-recipe"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- non-finite loss


def poison(monkeypatch, at_steps: set[int]):
    """Make the training loss NaN at the given optimizer steps (validation is left alone)."""
    real, calls = training_step.forward_loss, {"n": 0}

    def forward_loss(denoiser, *args, **kwargs):
        loss, stats = real(denoiser, *args, **kwargs)
        if denoiser.training:
            calls["n"] += 1
            if calls["n"] in at_steps:
                stats.loss_sum = float("nan")
                return loss * float("nan"), stats
        return loss, stats

    monkeypatch.setattr(training_step, "forward_loss", forward_loss)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {3})
    out = tmp_path / "nan"
    assert main([TINY, f"output_dir={out}", "max_steps=6", "save_every=2", "eval_every=0"]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (progress bars aside)
    assert len(err) == 1 and err[0].startswith("lad-finetune: error: ") and "non-finite loss nan at step 3" in err[0] and "step-000002" in err[0]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000002"]
    assert not (out / "adapter_model.safetensors").exists()  # no final weights from a diverged run
    weights = adapter(out / "checkpoints" / "step-000002")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_bad_steps_skips_the_update_a_bounded_number_of_times(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {3})
    out = train(tmp_path / "skip", "max_steps=3", "save_every=2", "eval_every=0", "keep_checkpoints=5",
                "skip_bad_steps=1")
    skipped = [m for m in metrics(out) if "skipped" in m]
    assert skipped == [{"step": 3, "skipped": "loss nan", "skipped_steps": 1}]
    before, after = adapter(out / "checkpoints" / "step-000002"), adapter(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step did not touch the weights
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["skipped_steps"] == 1

    poison(monkeypatch, {2, 3})
    assert main([TINY, f"output_dir={tmp_path / 'twice'}", "max_steps=4", "skip_bad_steps=1", *FAST]) == 3
    assert "at step 3" in capsys.readouterr().err


# ---------------------------------------------------------------- the report after training


def test_report_prints_answers_next_to_the_parent_and_scores_both(tmp_path, capsys):
    out = train(tmp_path / "report", "max_steps=2", *FAST, 'report.prompts=["What is 2+2?", "Name a colour."]',
                "report.iters=4", "report.max_new_tokens=8", "report.score_examples=4")
    printed = capsys.readouterr().out
    assert "> What is 2+2?" in printed and "> Name a colour." in printed and "AR parent" in printed
    saved = json.loads((out / "report.json").read_text())
    assert [a["prompt"] for a in saved["answers"]] == ["What is 2+2?", "Name a colour."]
    assert saved["scored_examples"] == 4
    assert saved["lad_nll_per_token"] > 0 and saved["ar_nll_per_token"] > 0
    assert saved["lad_nll_per_token"] != saved["ar_nll_per_token"]  # two different models

    from lad.generate import generate

    again = generate(str(out), ["What is 2+2?"], iters=4, max_new_tokens=8, seed=0)  # the run's own sampler
    assert again[0].text == saved["answers"][0]["lad"]  # the report shows what the saved run generates
    assert again[0].strategy == saved["strategy"] == "refine"  # the tiny recipe's mixed noise: as lad-generate
