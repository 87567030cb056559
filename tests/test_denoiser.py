"""Denoiser: logits alignment (shift), position selection, padding, the AR parent view, gradients."""

import copy

import pytest
import torch

from lad.modeling.bidirectional import is_causal
from lad.modeling.denoiser import Denoiser, position_ids_from_mask

from conftest import PAD_ID, make_tiny_model, random_ids, with_lora

MASK_ID = 262  # <|reserved_special_token_0|> of the byte tokenizer
NEG = torch.finfo(torch.float32).min
ATOL = 1e-5


def raw_logits(model, x, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=x, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


def suppressed(logits):
    out = logits.clone()
    out[..., MASK_ID] = NEG
    return out


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)
    assert torch.equal(position_ids_from_mask(mask.bool()), expected)


def test_no_shift_equals_model_logits_with_mask_column_suppressed():
    model = make_tiny_model("llama")
    den = Denoiser(model, MASK_ID, shift=False)
    assert not is_causal(model)  # constructing the Denoiser made the model bidirectional
    assert den.config is model.config and den.causal_lm is model
    x = random_ids(2, 7, seed=1)
    x[0, 3] = MASK_ID  # a masked input position
    with torch.no_grad():
        out = den(x)
    raw = raw_logits(model, x)
    assert out.shape == (2, 7, 266)
    assert (out[..., MASK_ID] == NEG).all()
    torch.testing.assert_close(out, suppressed(raw), atol=ATOL, rtol=0)
    assert not torch.equal(raw[..., MASK_ID], out[..., MASK_ID])
    # `logits` is the same method
    with torch.no_grad():
        torch.testing.assert_close(den.logits(x), out, atol=0, rtol=0)


def test_shift_reads_token_i_from_position_i_minus_1():
    model = make_tiny_model("llama")
    den = Denoiser(model, MASK_ID, shift=True)
    x = random_ids(2, 7, seed=2)
    with torch.no_grad():
        out = den(x)
    expected = suppressed(raw_logits(model, x))
    assert out.shape == (2, 7, 266)
    assert torch.equal(out[:, 0], torch.zeros(2, 266))
    torch.testing.assert_close(out[:, 1:], expected[:, :-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", [False, True])
def test_positions_select_exactly_those_rows(shift):
    den = Denoiser(make_tiny_model("llama"), MASK_ID, shift=shift)
    x = random_ids(3, 9, seed=3)
    generator = torch.Generator().manual_seed(4)
    positions = torch.rand(3, 9, generator=generator) < 0.5
    positions[:, 0] = False
    positions[0, 5] = True  # at least one per batch
    x[positions] = MASK_ID
    with torch.no_grad():
        full = den(x)
        picked = den(x, positions=positions)
    assert picked.shape == (int(positions.sum()), 266)
    torch.testing.assert_close(picked, full[positions], atol=ATOL, rtol=0)
    # an int mask is accepted as bool
    with torch.no_grad():
        torch.testing.assert_close(den(x, positions=positions.long()), picked, atol=0, rtol=0)
    # nothing selected -> empty
    with torch.no_grad():
        assert den(x, positions=torch.zeros_like(positions)).shape == (0, 266)


def test_shift_cannot_predict_position_zero():
    den = Denoiser(make_tiny_model("llama"), MASK_ID, shift=True)
    x = random_ids(2, 5, seed=5)
    positions = torch.zeros(2, 5, dtype=torch.bool)
    positions[1, 0] = True
    with pytest.raises(ValueError, match="first position"):
        den(x, positions=positions)
    # without shift position 0 is fine
    den_noshift = Denoiser(make_tiny_model("llama"), MASK_ID, shift=False)
    assert den_noshift(x, positions=positions).shape == (1, 266)


@pytest.mark.parametrize("shift", [False, True])
def test_left_padding_is_handled(shift):
    den = Denoiser(make_tiny_model("llama"), MASK_ID, shift=shift)
    long, short = random_ids(1, 7, seed=6)[0], random_ids(1, 4, seed=7)[0]
    ids = torch.stack([long, torch.cat([torch.full((3,), PAD_ID), short])])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = den(ids, attention_mask=mask)
        ref_long = den(long[None])[0]
        ref_short = den(short[None])[0]
        # explicit position ids give the same as the ones derived from the mask
        explicit = den(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    torch.testing.assert_close(out[0], ref_long, atol=ATOL, rtol=0)
    first = 4 if shift else 3  # with shift the first real token is read from a pad position: not compared
    torch.testing.assert_close(out[1, first:], ref_short[first - 3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, out, atol=0, rtol=0)

    # positions on a padded batch pick the same rows
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[0, 2] = positions[0, 6] = positions[1, 5] = positions[1, 6] = True
    with torch.no_grad():
        picked = den(ids, attention_mask=mask, positions=positions)
    torch.testing.assert_close(picked, out[positions], atol=ATOL, rtol=0)
    torch.testing.assert_close(picked[2:], ref_short[2:4], atol=ATOL, rtol=0)


def test_parent_logits_are_the_causal_base_model_without_the_adapter():
    base = make_tiny_model("llama")
    reference = copy.deepcopy(base)  # the untouched causal AR parent
    peft = with_lora(base)
    den = Denoiser(peft, MASK_ID)
    x = random_ids(2, 8, seed=8)
    ref = raw_logits(reference, x)

    # the adapter really changes the outputs, in either attention mode
    with torch.no_grad():
        adapted_bidir = den(x)
    assert not torch.allclose(adapted_bidir[..., :MASK_ID], suppressed(ref)[..., :MASK_ID], atol=1e-2)
    from lad.modeling.bidirectional import causal_attention
    with causal_attention(peft, True):
        assert not torch.allclose(raw_logits(peft, x), ref, atol=1e-2)

    with torch.no_grad():
        parent = den.parent_logits(x)
    torch.testing.assert_close(parent, ref, atol=ATOL, rtol=0)  # note: the mask column is not suppressed here
    # back to the bidirectional, adapted denoiser afterwards
    assert not is_causal(den.model)
    with torch.no_grad():
        torch.testing.assert_close(den(x), adapted_bidir, atol=0, rtol=0)

    # as_parent yields the causal base model; left padding through parent_logits
    with den.as_parent() as parent_model:
        assert parent_model is peft.get_base_model()
        assert is_causal(den.model)
        torch.testing.assert_close(raw_logits(parent_model, x), ref, atol=ATOL, rtol=0)
    assert not is_causal(den.model)

    short = random_ids(1, 5, seed=9)
    ids = torch.cat([torch.full((1, 3), PAD_ID), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = den.parent_logits(ids, attention_mask=mask)
    torch.testing.assert_close(padded[0, 3:], raw_logits(reference, short)[0], atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(den(x), adapted_bidir, atol=0, rtol=0)


def test_as_parent_restores_after_an_exception():
    den = Denoiser(with_lora(make_tiny_model("llama")), MASK_ID)
    x = random_ids(1, 6, seed=10)
    with torch.no_grad():
        before = den(x)
    with pytest.raises(RuntimeError):
        with den.as_parent():
            raise RuntimeError("inside")
    assert not is_causal(den.model)
    with torch.no_grad():
        torch.testing.assert_close(den(x), before, atol=0, rtol=0)


def test_gradients_reach_only_the_lora_parameters():
    den = Denoiser(with_lora(make_tiny_model("llama")), MASK_ID).train()
    x = random_ids(2, 8, seed=11)
    positions = torch.zeros_like(x, dtype=torch.bool)
    positions[:, 2:5] = True
    targets = x[positions]
    noisy = x.masked_fill(positions, MASK_ID)
    logits = den(noisy, positions=positions)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    loss.backward()
    named = dict(den.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    for name, param in named.items():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
