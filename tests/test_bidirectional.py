"""make_bidirectional / set_causal / causal_attention on tiny LLaMA-family models."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from lad.modeling.bidirectional import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    causal_attention,
    check_supported,
    is_causal,
    make_bidirectional,
    set_causal,
)
from lad.modeling.denoiser import position_ids_from_mask

from conftest import PAD_ID, make_tiny_config, make_tiny_model, random_ids

ARCHS = ["llama", "qwen2", "mistral", "qwen3"]
ATOL = 1e-5


def logits(model, input_ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).logits


def attention_flags(model):
    return [layer.self_attn.is_causal for layer in model.model.layers]


def change_last(x):
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256
    return y


def earlier_diff(model, x):
    """Per-position max |Δlogits| at positions 0..L-2 when only the last token changes."""
    return (logits(model, x) - logits(model, change_last(x)))[:, :-1].abs().amax(dim=(0, 2))


def left_pad(seqs, pad=PAD_ID):
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def right_pad(seqs, pad=PAD_ID):
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    return ids, mask


def test_every_supported_type_is_tested_here():
    assert set(SUPPORTED_MODEL_TYPES) == set(ARCHS)


@pytest.mark.parametrize("model_type", ARCHS)
def test_later_token_reaches_earlier_logits_only_when_bidirectional(model_type):
    model = make_tiny_model(model_type)
    x = random_ids(2, 8, seed=1)
    assert is_causal(model)
    assert attention_flags(model) == [True, True]
    before = logits(model, x)
    # causal parent: positions 0..6 cannot see token 7
    assert torch.equal(earlier_diff(model, x), torch.zeros(7))

    assert make_bidirectional(model) is model
    assert not is_causal(model)
    assert attention_flags(model) == [False, False]
    assert model.config.is_causal is False
    diff = earlier_diff(model, x)
    assert (diff > 1e-4).all(), diff  # every earlier position now sees the last token
    assert not torch.allclose(logits(model, x), before, atol=1e-4)

    # reversible: causal again, identical to the untouched model
    set_causal(model, True)
    assert is_causal(model)
    assert attention_flags(model) == [True, True]
    assert torch.equal(earlier_diff(model, x), torch.zeros(7))
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_does_not_change_real_token_logits(model_type, attn):
    model = make_bidirectional(make_tiny_model(model_type, attn_implementation=attn))
    seqs = [random_ids(1, n, seed=n)[0].tolist() for n in (7, 4, 5)]
    single = [logits(model, torch.tensor([s]))[0] for s in seqs]

    # left padding: positions come from the mask, so every real token keeps its position
    ids, mask = left_pad(seqs)
    out = logits(model, ids, mask, position_ids_from_mask(mask))
    for row, (s, ref) in enumerate(zip(seqs, single)):
        torch.testing.assert_close(out[row, ids.shape[1] - len(s):], ref, atol=ATOL, rtol=0)
    # the padding itself must stay hidden: unmasked pads change the real tokens' logits (this check can fail)
    unmasked = logits(model, ids, None, position_ids_from_mask(mask))
    assert not torch.allclose(unmasked[1, -4:], single[1], atol=1e-3)

    # right padding: no position ids needed
    ids, mask = right_pad(seqs)
    out = logits(model, ids, mask)
    for row, (s, ref) in enumerate(zip(seqs, single)):
        torch.testing.assert_close(out[row, :len(s)], ref, atol=ATOL, rtol=0)
    # bidirectional attention really hides the pads: without the mask real tokens would attend to them
    unmasked = logits(model, ids)
    assert not torch.allclose(unmasked[1, :4], single[1], atol=1e-3)

    # no padding, batched == single; an all-ones mask changes nothing
    same = [s[:4] for s in seqs]
    batch = torch.tensor(same)
    out = logits(model, batch)
    out_mask = logits(model, batch, torch.ones_like(batch))
    for row, s in enumerate(same):
        ref = logits(model, torch.tensor([s]))[0]
        torch.testing.assert_close(out[row], ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_mask[row], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ARCHS)
def test_eager_and_sdpa_agree_bidirectionally(model_type):
    eager = make_bidirectional(make_tiny_model(model_type, attn_implementation="eager"))
    sdpa = make_bidirectional(make_tiny_model(model_type, attn_implementation="sdpa"))
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    seqs = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (6, 3)]
    ids, mask = left_pad(seqs)
    pos = position_ids_from_mask(mask)
    a, b = logits(eager, ids, mask, pos), logits(sdpa, ids, mask, pos)
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(a[1, 3:], b[1, 3:], atol=ATOL, rtol=0)
    x = random_ids(2, 9, seed=3)
    torch.testing.assert_close(logits(eager, x), logits(sdpa, x), atol=ATOL, rtol=0)
    assert (earlier_diff(eager, x) > 1e-4).all() and (earlier_diff(sdpa, x) > 1e-4).all()


def test_models_sharing_one_config_object_stay_independent():
    config = make_tiny_config("llama")
    first = make_tiny_model(config=config, seed=0)
    second = make_tiny_model(config=config, seed=0)
    assert first.config is second.config is config  # transformers shares it: the hazard under test
    x = random_ids(1, 8, seed=4)

    make_bidirectional(first)
    assert not is_causal(first)
    assert first.config is not config
    assert all(m.config is first.config for m in first.modules() if hasattr(m, "config"))
    # the other model and the caller's config object are untouched
    assert is_causal(second)
    assert getattr(config, "is_causal", True) is True
    assert attention_flags(second) == [True, True]
    assert torch.equal(earlier_diff(second, x), torch.zeros(7))
    assert (earlier_diff(first, x) > 1e-4).all()

    # switching back and forth again does not leak either
    set_causal(first, True)
    set_causal(second, False)
    assert is_causal(first) and not is_causal(second)
    assert torch.equal(earlier_diff(first, x), torch.zeros(7))
    assert (earlier_diff(second, x) > 1e-4).all()


def test_a_saved_bidirectional_config_still_gets_copied(tmp_path):
    """Nothing LAD-private is saved to config.json, so models built from a reloaded config stay independent."""
    make_bidirectional(make_tiny_model("llama")).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not [key for key in saved if "lad" in key]
    assert saved["is_causal"] is False  # a saved denoiser reloads bidirectional

    config = AutoConfig.from_pretrained(tmp_path)
    first = make_tiny_model(config=config)
    second = make_tiny_model(config=config)
    assert first.config is second.config
    x = random_ids(1, 8, seed=8)
    assert not is_causal(second) and (earlier_diff(second, x) > 1e-4).all()
    set_causal(first, True)
    assert is_causal(first) and torch.equal(earlier_diff(first, x), torch.zeros(7))
    assert not is_causal(second) and config.is_causal is False
    assert (earlier_diff(second, x) > 1e-4).all()


def test_unsupported_architecture_raises_clearly():
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=266, bos_token_id=256,
                        eos_token_id=257)
    model = AutoModelForCausalLM.from_config(config)
    for call in (make_bidirectional, check_supported, lambda m: set_causal(m, True)):
        with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'gpt2' is not supported.*llama"):
            call(model)
    with pytest.raises(ValueError):  # a ValueError subclass, so callers can catch it broadly
        make_bidirectional(model)
    assert model.config is config  # nothing was touched
    assert getattr(config, "is_causal", True) is True
    with pytest.raises(UnsupportedArchitectureError):
        with causal_attention(model):
            pass


def test_causal_attention_restores_the_mode():
    model = make_bidirectional(make_tiny_model("llama"))
    x = random_ids(1, 8, seed=5)
    bidir = logits(model, x)
    with causal_attention(model) as inside:
        assert inside is model
        assert is_causal(model) and attention_flags(model) == [True, True]
        assert torch.equal(earlier_diff(model, x), torch.zeros(7))
    assert not is_causal(model) and attention_flags(model) == [False, False]
    torch.testing.assert_close(logits(model, x), bidir, atol=0, rtol=0)

    # restored after an exception too
    with pytest.raises(RuntimeError, match="boom"):
        with causal_attention(model, True):
            raise RuntimeError("boom")
    assert not is_causal(model)

    # the other direction: a causal model runs bidirectionally inside and is causal after
    causal = make_tiny_model("llama")
    with causal_attention(causal, False):
        assert not is_causal(causal)
        assert (earlier_diff(causal, x) > 1e-4).all()
    assert is_causal(causal) and attention_flags(causal) == [True, True]
    assert torch.equal(earlier_diff(causal, x), torch.zeros(7))


def test_make_bidirectional_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    make_bidirectional(model)
    assert not is_causal(model)
    base = model.get_base_model()
    assert attention_flags(base) == [False, False]
    x = random_ids(1, 8, seed=6)
    assert (earlier_diff(model, x) > 1e-4).all()
    set_causal(model, True)
    assert torch.equal(earlier_diff(model, x), torch.zeros(7))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available(),
                    reason="flash_attention_2 needs flash_attn and a CUDA GPU")
def test_flash_attention_2_bidirectional_matches_sdpa():
    dtype = torch.bfloat16
    flash = make_tiny_model("llama", attn_implementation="flash_attention_2").to("cuda", dtype)
    sdpa = make_tiny_model("llama", attn_implementation="sdpa").to("cuda", dtype)
    make_bidirectional(flash)
    make_bidirectional(sdpa)
    seqs = [random_ids(1, n, seed=20 + n)[0].tolist() for n in (9, 5)]
    ids, mask = left_pad(seqs)
    ids, mask = ids.cuda(), mask.cuda()
    pos = position_ids_from_mask(mask)
    a, b = logits(flash, ids, mask, pos).float(), logits(sdpa, ids, mask, pos).float()
    torch.testing.assert_close(a[0], b[0], atol=2e-2, rtol=0)
    torch.testing.assert_close(a[1, 4:], b[1, 4:], atol=2e-2, rtol=0)
    x = random_ids(1, 8, seed=7).cuda()
    assert (earlier_diff(flash, x) > 1e-3).all()
    set_causal(flash, True)
    assert (earlier_diff(flash, x) == 0).all()
