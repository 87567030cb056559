"""Parent distillation: where the causal parent is a valid target, its alignment, and the KL term."""

import torch

from conftest import with_lora
from lad.loss import distill_positions, kl_to_parent
from lad.modeling.denoiser import Denoiser

M = 9  # mask id in these hand-made rows


def test_positions_are_masked_tokens_with_nothing_visible_after_them():
    noisy = torch.tensor([[1, 2, M, 4, M, M, 0],    # prompt 1,2 | answer M 4 M M | pad
                          [1, 2, M, M, M, M, 0],    # a fully masked answer: every position
                          [1, 2, 3, 4, M, M, 0]])   # structural row: never
    answer = torch.tensor([[0, 0, 1, 1, 1, 1, 0]] * 3).bool()
    structural = torch.tensor([False, False, True])
    got = distill_positions(noisy, answer, M, structural)
    assert got.long().tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0], [0] * 7]


def test_kl_is_zero_when_the_student_runs_as_the_parent(tiny_model, ids):
    """Adapter off, causal attention, shift on, clean input: the student is the parent, so KL is 0."""
    den = Denoiser(with_lora(tiny_model("llama")), mask_id=260, shift=True)
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    positions = mask.bool().clone()
    positions[0, 0] = positions[1, 3] = False  # first real tokens: nothing precedes them
    weights = torch.rand(int(positions.sum()))
    with torch.no_grad():
        target = den.parent_logits_at(x, mask, positions)
        with den.as_parent():
            as_parent = den(x, mask, positions=positions)
        student = den(x, mask, positions=positions)  # bidirectional with the adapter: not the parent
    assert kl_to_parent(as_parent, target, weights).abs().item() < 1e-5
    assert kl_to_parent(student, target, weights).item() > 1e-2


def test_parent_logits_at_reads_the_next_token_distribution(tiny_model, ids):
    den = Denoiser(with_lora(tiny_model("llama")), mask_id=260)
    x = ids(2, 10)
    mask = torch.ones_like(x)
    positions = torch.zeros_like(x, dtype=torch.bool)
    positions[0, [3, 7]] = positions[1, [1, 9]] = True
    with torch.no_grad():
        full = den.parent_logits(x, mask)  # index i predicts token i + 1
        got = den.parent_logits_at(x, mask, positions)
    expected = full[[0, 0, 1, 1], [2, 6, 0, 8]]
    expected[:, 260] = torch.finfo(expected.dtype).min  # the mask token is never a prediction
    assert torch.allclose(got, expected, atol=1e-5)
    assert den.model.base_model.model.model.config.is_causal is False  # bidirectional again afterwards


def test_kl_weights_and_value():
    p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    pp = torch.softmax(p[1], -1)
    expected = 3.0 * (pp * (pp.log() - torch.tensor(0.5).log())).sum()
    assert torch.allclose(kl_to_parent(q, p, torch.tensor([5.0, 3.0])), expected)


def test_chunked_kl_matches_autograd_value_and_gradient():
    """The chunked KL with its hand-written backward equals autograd's on the plain formula, for N not a
    multiple of the chunk, and a bf16 input gets a bf16 gradient."""
    torch.manual_seed(0)
    logits = torch.randn(11, 37, dtype=torch.float64, requires_grad=True)
    parent = torch.randn(11, 37, dtype=torch.float64)
    parent[:, 5] = torch.finfo(parent.dtype).min  # the parent never predicts the mask token
    weights = torch.rand(11, dtype=torch.float64)
    log_q, log_p = logits.log_softmax(-1), parent.log_softmax(-1)
    plain = ((log_p.exp() * (log_p - log_q)).sum(-1) * weights).sum()
    (want,) = torch.autograd.grad(plain, logits)
    got_value = kl_to_parent(logits, parent, weights, chunk=4)
    (got,) = torch.autograd.grad(got_value * 2.0, logits)
    assert torch.allclose(got_value.double(), plain, atol=1e-5)
    assert torch.allclose(got.double(), 2.0 * want, atol=1e-6)
    half = logits.detach().bfloat16().requires_grad_()
    kl_to_parent(half, parent.float(), weights.float(), chunk=4).backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()
