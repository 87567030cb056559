"""Attention annealing: the mask at progress 0 is the parent's causal one, at 1 the bidirectional one."""

import pytest
import torch

from lad.modeling.anneal import anneal_progress, annealed_mask
from lad.modeling.bidirectional import causal_attention
from lad.modeling.denoiser import Denoiser, position_ids_from_mask


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def padding_mask():
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return mask


def allowed(mask4d):
    return mask4d[:, 0] == 0


def test_progress_reaches_one_at_anneal_steps():
    assert [anneal_progress(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert anneal_progress(0, 0) == 1.0  # off: bidirectional from the start


def test_progress_zero_is_causal_and_one_is_bidirectional_with_padding_hidden():
    mask = padding_mask()
    causal = torch.ones(10, 10, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    assert torch.equal(allowed(annealed_mask(mask, 0.0, gens(3))), causal)
    assert torch.equal(allowed(annealed_mask(mask, 1.0, gens(3))), mask.bool()[:, None, :].expand(3, 10, 10))


def test_share_of_visible_later_tokens_follows_progress():
    mask = torch.ones(2, 64, dtype=torch.long)
    upper = torch.ones(64, 64, dtype=torch.bool).triu(1)
    shares = [allowed(annealed_mask(mask, p, gens(2)))[:, upper].float().mean().item() for p in (0.1, 0.5, 0.9)]
    assert shares == sorted(shares)
    for share, p in zip(shares, (0.1, 0.5, 0.9)):
        assert abs(share - p) < 0.03


def test_each_row_draws_from_its_own_generator():
    mask = torch.ones(2, 12, dtype=torch.long)
    pair = annealed_mask(mask, 0.5, gens(2, seed=5))
    alone = annealed_mask(mask[1:], 0.5, gens(1, seed=6))
    assert torch.equal(pair[1:], alone)
    with pytest.raises(ValueError, match="generators"):
        annealed_mask(mask, 0.5, gens(1))


def test_model_uses_the_mask_causal_at_zero_bidirectional_at_one(tiny_model, ids):
    den = Denoiser(tiny_model("llama"), mask_id=5)
    x, mask = ids(3, 10), padding_mask()
    pos = position_ids_from_mask(mask)
    real = mask.bool()
    with torch.no_grad():
        bidirectional = den(x, mask, position_ids=pos)
        with causal_attention(den.model, True):
            causal = den(x, mask, position_ids=pos)
        at0 = den(x, annealed_mask(mask, 0.0, gens(3)), position_ids=pos)
        at1 = den(x, annealed_mask(mask, 1.0, gens(3)), position_ids=pos)
        half = den(x, annealed_mask(mask, 0.5, gens(3)), position_ids=pos)
    assert torch.allclose(at0[real], causal[real], atol=1e-5)
    assert torch.allclose(at1[real], bidirectional[real], atol=1e-5)
    assert not torch.allclose(half[real], causal[real], atol=1e-3)
    assert not torch.allclose(causal[real], bidirectional[real], atol=1e-3)
