"""Shared fixtures: LAD's byte tokenizer and tiny random LLaMA-family models built from a config.

`tiny_config(model_type, **overrides)` and `tiny_model(model_type | config=..., seed=..., **overrides)` are
factories (fixtures returning functions), so a test can build several models, e.g. two from one config object.
Defaults: hidden 32, 2 layers, 4 heads, 2 kv heads (head_dim 8), vocab = len(byte tokenizer) = 266, and the
byte tokenizer's bos/eos/pad ids. Models come back in eval mode (no dropout), fp32, SDPA attention unless
`attn_implementation` says otherwise, with weights fixed by `seed` (the global RNG is left untouched).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread and lose a lot when the other core is busy; subprocesses
# (accelerate launch, lad-finetune, torchrun) inherit the same setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lad.modeling.byte_tokenizer import build_byte_tokenizer

BYTE_VOCAB = len(build_byte_tokenizer())  # 266: 256 bytes + bos, eos, pad, 3 roles, 4 reserved
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=False,
)


def make_tiny_config(model_type: str = "llama", *, vocab_size: int = BYTE_VOCAB, **overrides) -> PretrainedConfig:
    options = {**TINY, "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(model_type, **options)


def make_tiny_model(model_type: str = "llama", *, config: PretrainedConfig | None = None, seed: int = 0,
                    attn_implementation: str = "sdpa", **overrides):
    """A random tiny causal LM; `config` (used as is, not copied) wins over `model_type`/`overrides`."""
    if config is None:
        config = make_tiny_config(model_type, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture
def byte_tokenizer():
    """A fresh byte tokenizer (tests may add tokens to it)."""
    return build_byte_tokenizer()


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture
def tiny_model():
    return make_tiny_model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Byte ids (0..255) only: never a special token, so never the mask token."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=generator)


@pytest.fixture
def ids():
    return random_ids


def causal_hidden(den, ids, mask):
    """The denoiser's decoder run causally (adapter on, transformers' own causal mask): how the parent's reading
    of a prompt looks with the adapter, which a prompt-causal model's prompt positions must reproduce."""
    from lad.modeling.bidirectional import causal_attention

    with torch.no_grad(), causal_attention(den.model, True):
        return den.causal_lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state


def with_lora(model, seed=0):
    """A LoRA adapter whose B weights are nonzero, so it really changes the outputs; A and B fixed by `seed`."""
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and several stall badly on a busy machine
    (modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- tiny training runs (recipes/tiny.yaml, in-process)

TINY_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
FAST = ["eval_every=0", "save_every=0"]  # no validation or checkpoints between steps


def train_tiny(out: Path, *overrides: str) -> Path:
    """Train recipes/tiny.yaml into `out` with `key=value` overrides; fails the test unless it exits 0."""
    from lad.finetune import main

    assert main([TINY_RECIPE, f"output_dir={out}", *overrides]) == 0
    return out


def stopped_copy(run: Path, copy: Path, step: int, later: int) -> Path:
    """`copy` of the finished `run` as if it had stopped right after its step-`step` checkpoint (the checkpoint of
    step `later` and the final weights gone, metrics cut), to resume and compare with the straight run."""
    import shutil

    shutil.copytree(run, copy)
    for name in ("adapter_config.json", "adapter_model.safetensors", "lad.json", "README.md"):
        (copy / name).unlink(missing_ok=True)
    shutil.rmtree(copy / "checkpoints" / f"step-{later:06d}")
    kept = [m for m in read_metrics(run) if m["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept), encoding="utf-8")
    return copy


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def read_adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))
