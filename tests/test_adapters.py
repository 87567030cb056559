"""prepare_embeddings, attach_lora (LoRA, trained mask-token row, QLoRA) and count_parameters."""

import importlib.util

import pytest
import torch

from lad.modeling.adapters import attach_lora, count_parameters, prepare_embeddings
from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.denoiser import Denoiser
from lad.modeling.mask_token import MaskToken, resolve_mask_token
from lad.recipe import LoraSpec, ModelSpec

from conftest import TINY, make_tiny_model, random_ids

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
SPEC = LoraSpec(r=4, alpha=8, dropout=0.0)


def lora_module_names(model):
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def expected_lora_params(r, names=LINEAR_NAMES, config=None):
    c = dict(TINY) if config is None else config.to_dict()
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return c["num_hidden_layers"] * sum(r * (fan_in + fan_out) for n, (fan_in, fan_out) in shapes.items()
                                        if n in names)


def test_prepare_embeddings_keeps_the_size_for_a_reserved_token(byte_tokenizer):
    model = make_tiny_model()
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    mask = resolve_mask_token(byte_tokenizer)
    assert not mask.added
    prepare_embeddings(model, byte_tokenizer)
    assert model.get_input_embeddings().weight is weight
    assert torch.equal(weight, before)
    assert model.config.vocab_size == 266


def test_prepare_embeddings_never_shrinks_a_larger_vocabulary(byte_tokenizer):
    model = make_tiny_model(vocab_size=300)  # models often pad their vocabulary beyond the tokenizer
    resolve_mask_token(byte_tokenizer, "<|new|>")  # adds a token: the tokenizer grows to 267
    prepare_embeddings(model, byte_tokenizer)
    assert len(byte_tokenizer) == 267
    assert model.get_input_embeddings().weight.shape == (300, 32)
    assert model.get_output_embeddings().weight.shape == (300, 32)


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_embeddings_adds_the_new_row_at_the_mean(tied):
    tok = build_byte_tokenizer(reserved=0)
    model = make_tiny_model(vocab_size=len(tok), tie_word_embeddings=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    mask = resolve_mask_token(tok)
    assert mask == MaskToken("<|mask|>", 262, added=True)
    prepare_embeddings(model, tok)
    new_in = model.get_input_embeddings().weight
    assert new_in.shape == (263, 32)
    assert model.get_output_embeddings().weight.shape == (263, 32)
    assert model.config.vocab_size == 263
    assert torch.equal(new_in[:262], old_in)
    torch.testing.assert_close(new_in[262], old_in.mean(0), atol=1e-4, rtol=0)
    if tied:
        assert model.get_output_embeddings().weight is new_in
    else:
        assert torch.equal(model.get_output_embeddings().weight[:262], old_out)
    # a second call is a no-op
    prepare_embeddings(model, tok)
    assert model.get_input_embeddings().weight.shape == (263, 32)
    # the resized model runs on the mask id
    with torch.no_grad():
        assert model(torch.tensor([[97, 262, 98]])).logits.shape == (1, 3, 263)


def effective_rows(peft_model):
    """Rows of the input embedding and of the LM head as the adapted model uses them."""
    base = peft_model.get_base_model()
    vocab = base.config.vocab_size
    with torch.no_grad():
        inp = peft_model.get_input_embeddings()(torch.arange(vocab)).clone()
        out = base.get_output_embeddings()(torch.eye(base.config.hidden_size)).T.clone()  # [V, H]
    return inp, out


@pytest.mark.parametrize("tied", [False, True])
def test_added_mask_token_trains_only_its_embedding_row(tied):
    tok = build_byte_tokenizer(reserved=0)
    model = make_tiny_model(vocab_size=len(tok), tie_word_embeddings=tied).train()
    mask = resolve_mask_token(tok)
    prepare_embeddings(model, tok)
    raw_embedding = model.get_input_embeddings().weight.detach().clone()
    peft = attach_lora(model, SPEC, mask)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    token_params = {n for n in trainable if "lora_" not in n}
    assert len(token_params) == 1 and "trainable_tokens_delta" in next(iter(token_params))

    in0, out0 = effective_rows(peft)
    if tied:
        torch.testing.assert_close(in0, out0, atol=1e-6, rtol=0)
    den = Denoiser(peft, mask.id)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    x = random_ids(2, 8, seed=1)
    positions = torch.zeros_like(x, dtype=torch.bool)
    positions[:, 1:6:2] = True
    loss = torch.nn.functional.cross_entropy(den(x.masked_fill(positions, mask.id), positions=positions),
                                             x[positions])
    loss.backward()
    optimizer.step()

    in1, out1 = effective_rows(peft)
    others = torch.arange(263) != mask.id
    assert torch.equal(in1[others], in0[others])
    assert not torch.allclose(in1[mask.id], in0[mask.id], atol=1e-4)
    assert torch.equal(out1[others], out0[others])
    if tied:  # the output row moves with the input row
        assert not torch.allclose(out1[mask.id], out0[mask.id], atol=1e-4)
        torch.testing.assert_close(in1, out1, atol=1e-6, rtol=0)
    else:  # an untied head row is never trained (the mask is never a prediction)
        assert torch.equal(out1[mask.id], out0[mask.id])
    # the frozen base weight itself is untouched
    base_weight = peft.get_base_model().model.embed_tokens.token_adapter.base_layer.weight \
        if hasattr(peft.get_base_model().model.embed_tokens, "token_adapter") else None
    if base_weight is not None:
        assert torch.equal(base_weight, raw_embedding)


def test_reserved_mask_token_leaves_the_embeddings_frozen(byte_tokenizer):
    model = make_tiny_model().train()
    mask = resolve_mask_token(byte_tokenizer)
    prepare_embeddings(model, byte_tokenizer)
    peft = attach_lora(model, SPEC, mask)
    assert all("lora_A" in n or "lora_B" in n for n, p in peft.named_parameters() if p.requires_grad)
    in0, out0 = effective_rows(peft)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    den = Denoiser(peft, mask.id)
    x = random_ids(2, 6, seed=2)
    positions = torch.zeros_like(x, dtype=torch.bool)
    positions[:, 2] = True
    torch.nn.functional.cross_entropy(den(x.masked_fill(positions, mask.id), positions=positions),
                                      x[positions]).backward()
    optimizer.step()
    in1, out1 = effective_rows(peft)
    assert torch.equal(in1, in0) and torch.equal(out1, out0)


def test_all_linear_targets_every_projection_but_not_the_head(byte_tokenizer):
    peft = attach_lora(make_tiny_model(), SPEC, resolve_mask_token(byte_tokenizer))
    names = lora_module_names(peft)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == LINEAR_NAMES
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert peft.peft_config["default"].r == 4 and peft.peft_config["default"].lora_alpha == 8


def test_explicit_target_modules(byte_tokenizer):
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft = attach_lora(make_tiny_model(), spec, resolve_mask_token(byte_tokenizer))
    names = lora_module_names(peft)
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert count_parameters(peft)[0] == expected_lora_params(2, {"q_proj", "v_proj"})


def test_count_parameters(byte_tokenizer):
    model = make_tiny_model()
    total = sum(p.numel() for p in model.parameters())
    h, v = 32, 266
    per_layer = (32 * 32 * 2 + 32 * 16 * 2) + 3 * 32 * 64 + 2 * h  # attention, MLP, two RMSNorms
    assert total == 2 * v * h + 2 * per_layer + h  # embeddings, head, blocks, final norm
    assert count_parameters(model) == (total, total)

    peft = attach_lora(model, SPEC, resolve_mask_token(byte_tokenizer))
    lora = expected_lora_params(4)
    assert lora == 4096
    assert count_parameters(peft) == (lora, total + lora)

    tok = build_byte_tokenizer(reserved=0)
    model = make_tiny_model(vocab_size=len(tok))
    mask = resolve_mask_token(tok)
    prepare_embeddings(model, tok)
    base_total = sum(p.numel() for p in model.parameters())
    peft = attach_lora(model, SPEC, mask)
    assert count_parameters(peft) == (lora + h, base_total + lora + h)  # + the mask row's delta


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_4bit_through_load_base(tmp_path, byte_tokenizer):
    from transformers.integrations import validate_bnb_backend_availability

    if not validate_bnb_backend_availability():
        pytest.skip("bitsandbytes has no backend for the devices here")
    import bitsandbytes as bnb

    from lad.modeling.load import load_base

    # bitsandbytes quantizes in blocks of 64 inputs: every in_features must be a multiple of 64
    reference = make_tiny_model(hidden_size=64, intermediate_size=128, head_dim=16)
    reference.save_pretrained(tmp_path / "tiny")
    byte_tokenizer.save_pretrained(tmp_path / "tiny")
    spec = ModelSpec(name_or_path=str(tmp_path / "tiny"), dtype="fp32", quantization="4bit")
    model, tok = load_base(spec)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every projection; the head stays in full precision
    assert all(m.weight.quant_type == "nf4" for m in quantized)
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant

    mask = resolve_mask_token(tok)
    peft = attach_lora(model, SPEC, mask, quantized=True)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert count_parameters(peft)[0] == expected_lora_params(4, config=reference.config)

    device = next(peft.parameters()).device
    den = Denoiser(peft, mask.id)
    x = random_ids(2, 8, seed=3).to(device)
    positions = torch.zeros_like(x, dtype=torch.bool)
    positions[:, 3] = True
    logits = den(x.masked_fill(positions, mask.id), positions=positions)
    loss = torch.nn.functional.cross_entropy(logits.float(), x[positions])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in peft.named_parameters() if p.requires_grad and "lora_B" in n)
    # 4-bit weights approximate the full-precision model
    with den.as_parent() as parent, torch.no_grad():
        approx = parent(input_ids=x).logits.float().cpu()
    with torch.no_grad():
        exact = reference(input_ids=x.cpu()).logits
    assert torch.nn.functional.cosine_similarity(approx.flatten(), exact.flatten(), dim=0) > 0.9
