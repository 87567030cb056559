"""Training options of lad/finetune.py on the tiny recipe, run in-process (a few seconds each)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, read_adapter as adapter, read_metrics as metrics, train_tiny as train

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def test_grad_accum_equals_a_bigger_batch(tmp_path):
    """Noise is seeded per (step, row) and the loss normalised per optimizer step, so 2×8 == 1×16.

    Adam with a tiny eps divides float-rounding noise in near-zero gradients by itself (g/|g| flips sign), so
    eps=1 makes the update smooth in the gradient and the comparison meaningful.
    """
    same = ["max_steps=6", "optim.eps=1.0", "optim.lr=0.5", *FAST]
    a = adapter(train(tmp_path / "a", "batch_size=16", "grad_accum=1", *same))
    b = adapter(train(tmp_path / "b", "batch_size=8", "grad_accum=2", *same))
    c = adapter(train(tmp_path / "c", "batch_size=16", "grad_accum=1", "seed=1", *same))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)  # a different seed does differ


def test_epochs_are_honoured(tmp_path):
    out = train(tmp_path / "e", "max_steps=null", "epochs=1", *FAST)
    # 461 training examples (512 minus 10% validation... capped at val_max_examples=32) / 16 per step
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps[-1] == (512 - 32) // 16
    out = train(tmp_path / "f", "max_steps=5", "epochs=1", *FAST)  # both given: whichever ends first
    assert [m["step"] for m in metrics(out) if "loss" in m][-1] == 5


def test_tensorboard_tracker_writes_events(tmp_path):
    out = train(tmp_path / "tb", "max_steps=3", "report_to=[tensorboard]", *FAST)
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file written"


def test_bf16_and_gradient_checkpointing(tmp_path):
    out = train(tmp_path / "bf", "max_steps=4", "precision=bf16", "gradient_checkpointing=true", *FAST)
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_gradient_checkpointing_is_switched_on_through_the_current_api():
    from lad.finetune import load_model
    from lad.recipe import load_recipe

    from conftest import TINY_RECIPE

    for on in (True, False):
        model, _, _ = load_model(load_recipe(TINY_RECIPE, [f"gradient_checkpointing={str(on).lower()}"]))
        flag = getattr(type(model), "is_activation_checkpointing", None)  # the new name, when transformers has it
        assert (model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing) is on


@pytest.mark.parametrize("options", [
    ["shift=true", "noise.objective=mask"],
    ["noise.objective=structural", "eos_padding=true"],
    ["lora.enabled=false"],
])
def test_objectives_shift_and_full_finetune_learn(tmp_path, options):
    out = train(tmp_path / "o", "max_steps=30", "eval_every=30", "save_every=0", *options)
    val = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert val[-1] < 0.8 * val[0], val
    info = json.loads((out / "lad.json").read_text())
    assert info["shift"] == ("shift=true" in options)
    assert info["adapter"] == ("full" if "lora.enabled=false" in options else "lora")


def test_validation_noise_is_the_same_in_every_run(tmp_path):
    a = metrics(train(tmp_path / "a", "max_steps=1", "eval_every=1", "save_every=0"))
    b = metrics(train(tmp_path / "b", "max_steps=1", "eval_every=1", "save_every=0", "optim.lr=1e-2"))
    assert a[0]["val_loss"] == b[0]["val_loss"]  # step 0: same model, same deterministic noise


@needs_bnb
def test_qlora_and_8bit_adamw(tmp_path):
    base = train(tmp_path / "base_run", "max_steps=1", *FAST) / "base"
    out = train(tmp_path / "q", "max_steps=3", "model.init=pretrained", "model.config={}",
                f"model.name_or_path={base}", "model.quantization=4bit", "optim.name=adamw_8bit", *FAST)
    info = json.loads((out / "lad.json").read_text())
    assert info["base_model"]["quantization"] == "4bit"
    from lad.run import load_run

    denoiser, _, _ = load_run(out)
    linear = denoiser.causal_lm.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
