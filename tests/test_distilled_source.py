"""A recipe source with `distill:`: the parent answers its prompts once (cached), and training reads the answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lad.distill.answers
from lad.data.distilled import cache_file
from lad.finetune import main
from lad.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
FAST = ["eval_every=0", "save_every=0"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("LAD_CACHE", str(tmp_path / "cache"))
    assert main([TINY, f"output_dir={tmp_path / 'scratch'}", "max_steps=1", *FAST]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Say the number {i}.\n" for i in range(12)), encoding="utf-8")
    overrides = ["model.init=pretrained", "model.config={}", f"model.name_or_path={tmp_path / 'scratch' / 'base'}",
                 f"data.train.0.path={prompts}", "data.train.0.distill.max_new_tokens=6",
                 "data.train.0.distill.limit=10", "data.train.0.distill.keep_cut=true", "data.val_fraction=0.2", "batch_size=4", "max_steps=2", *FAST]
    return tmp_path, overrides


def test_distilled_source_is_answered_once_then_read_from_the_cache(setup, monkeypatch):
    tmp_path, overrides = setup
    assert main([TINY, f"output_dir={tmp_path / 'a'}", *overrides]) == 0
    target = cache_file(load_recipe(TINY, overrides).data.train[0], load_recipe(TINY, overrides))
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [f"Say the number {i}." for i in range(10)]
    assert all(r["source"] == "distill" and r["settings"]["max_new_tokens"] == 6 for r in rows)
    recipe = (tmp_path / "a" / "recipe.yaml").read_text()
    assert "max_new_tokens: 6" in recipe and "prompts.txt" in recipe  # the run records the source, not the cache

    def no_load(*args, **kwargs):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr(lad.distill.answers, "_load", no_load)
    assert main([TINY, f"output_dir={tmp_path / 'b'}", *overrides]) == 0  # same recipe: no parent forward
    assert [json.loads(line) for line in target.read_text().splitlines()] == rows
    monkeypatch.undo()

    other = [*overrides[:-len(FAST) - 1], "data.train.0.distill.max_new_tokens=4", "max_steps=2", *FAST]
    assert cache_file(load_recipe(TINY, other).data.train[0], load_recipe(TINY, other)) != target


def test_distilled_sources_are_checked_before_anything_loads(setup, capsys):
    tmp_path, overrides = setup
    assert main([TINY, f"output_dir={tmp_path / 'c'}", *overrides, "data.train.0.format=text"]) == 2
    assert "a distilled source is an instruction set" in capsys.readouterr().err
    assert main([TINY, f"output_dir={tmp_path / 'd'}", *overrides, "data.train.0.distill.max_new_tokens=0"]) == 2
    assert "max_new_tokens: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_answers_cut_at_max_new_tokens_are_left_out_unless_kept(tmp_path):
    from lad.data.distilled import finished_rows

    answers = tmp_path / "a.jsonl"
    rows = [{"instruction": f"q{i}", "input": "", "output": "x", "finish": "eos" if i % 2 else "length"}
            for i in range(6)]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = finished_rows(answers)
    assert [json.loads(line)["instruction"] for line in kept.read_text().splitlines()] == ["q1", "q3", "q5"]
    assert finished_rows(answers) == kept and answers.read_text().count("\n") == 6  # the answers stay whole
