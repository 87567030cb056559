"""eval/gpu_check.py on a CPU: the random base it builds loads through LAD's loader with the asked shape, and the
run summary reads throughput, GPU peaks and what the saved adapter holds (the checks that tell a broken FSDP save)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.gpu_check import SHAPES, make_base, summarise  # noqa: E402
from lad.modeling.load import load_base  # noqa: E402
from lad.recipe import ModelSpec  # noqa: E402


def test_make_base_writes_a_loadable_random_model_of_the_asked_shape(tmp_path, byte_tokenizer):
    byte_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "base"
    info = make_base("tiny", str(tmp_path / "tok"), str(out), "cpu")
    assert (out / "RANDOM_WEIGHTS.txt").is_file() and list(out.glob("*.safetensors"))
    model, tokenizer = load_base(ModelSpec(name_or_path=str(out), dtype="bf16"))
    assert model.config.hidden_size == SHAPES["tiny"]["hidden_size"]
    assert model.config.vocab_size == SHAPES["tiny"]["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.eos_token_id == model.config.eos_token_id


def test_llama3_8b_shape_has_eight_billion_parameters():
    s = SHAPES["llama3-8b"]
    h, inter, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    total = layers * per_layer + 2 * vocab * h + h
    assert total == 8_030_261_248  # Llama-3.1-8B's parameter count


def test_summarise_reads_throughput_peaks_and_the_adapter(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": 9.0, "tokens": 100, "tokens_per_s": 50.0, "gpu_peak_allocated_mb": 10},
             {"step": 2, "loss": 8.0, "tokens": 300, "tokens_per_s": 200.0, "gpu_peak_allocated_mb": 30},
             {"step": 2, "val_loss": 7.5},
             {"step": 3, "loss": 7.0, "tokens": 500, "tokens_per_s": 100.0, "gpu_peak_allocated_mb": 20}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    save_file({"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.full((4, 2), -0.5)},
              str(run / "adapter_model.safetensors"))
    got = summarise([str(run), str(tmp_path / "missing")])[str(run)]
    assert got["steps"] == 3 and got["tokens_per_s_median"] == 150.0 and got["tokens_per_step_median"] == 200
    assert got["gpu_peak_allocated_mb"] == 30 and got["val_loss"] == 7.5 and got["loss_first_last"] == [9.0, 7.0]
    assert got["adapter_tensors"] == 2 and got["adapter_parameters"] == 16 and got["adapter_finite"]
    assert got["lora_B_max_abs"] == 0.5
    assert "error" in summarise([str(tmp_path / "missing")])[str(tmp_path / "missing")]


def test_an_untrained_or_broken_adapter_shows_in_the_summary(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "tokens": 5, "tokens_per_s": 1.0}) + "\n")
    save_file({"a.lora_B.weight": torch.zeros(4, 2), "b.lora_A.weight": torch.tensor([float("nan")])},
              str(run / "adapter_model.safetensors"))
    got = summarise([str(run)])[str(run)]
    assert got["lora_B_max_abs"] == 0.0 and got["adapter_finite"] is False


def test_the_8b_shape_s_rope_settings_build_a_working_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    small = {**SHAPES["llama3-8b"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
    config = LlamaConfig(**small)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    logits = LlamaForCausalLM(config)(torch.randint(0, 300, (1, 9))).logits
    assert logits.shape == (1, 9, 300) and torch.isfinite(logits).all()
