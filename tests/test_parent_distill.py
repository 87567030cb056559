"""Parent distillation: where the causal parent is a valid target, its alignment, and the KL term."""

import torch

from conftest import with_lora
from lad.loss import distill_positions, kl_to_parent, per_row_mean_weights, prompt_positions
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


def test_prompt_positions_are_the_tokens_read_from_a_prompt_column():
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                              [0, 0, 1, 1, 1, 1, 1]])  # left padding
    answer = torch.tensor([[0, 0, 0, 1, 1, 1, 1],
                           [0, 0, 0, 0, 1, 1, 1]])
    got = prompt_positions(attention, answer)
    # prompt 3 tokens: tokens 1, 2 (the prompt's own) and 3 (the first answer token); nothing from padding
    assert got.long().tolist() == [[0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]]
    assert per_row_mean_weights(got).sum(-1).tolist() == [1.0, 1.0]


def _prompt_kl_loss(den, weight):
    """forward_loss on a hand-made prompt-causal batch whose answers are all masks: (loss, stats)."""
    from lad.noise import Corruption
    from lad.training.step import forward_loss

    x = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(x)
    attention[1, :2] = 0
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, 6:] = True
    batch = {"input_ids": x, "attention_mask": attention, "answer_mask": answer, "real_answer": answer,
             "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
             "answer_start": torch.tensor([6, 6])}
    noisy = torch.where(answer, torch.full_like(x, 260), x)
    corruption = Corruption(noisy_ids=noisy, loss_mask=answer, weights=answer.float() / 4,
                            levels=torch.ones(2), structural=torch.zeros(2, dtype=torch.bool))
    return forward_loss(den, batch, corruption, 260, "cpu", distill_weight=1.0, prompt_distill_weight=weight,
                        parent=den.parent_logits_at)


def test_prompt_kl_holds_the_adapter_to_the_parent_on_the_causally_read_prompt(tiny_model):
    """Prompt-causal attention with the shift: the prompt's columns read only the prompt, so with the adapter at
    zero they ARE the parent (KL 0) whatever the answer holds; an adapter that moves them pays a KL whose gradient
    reaches the LoRA weights. The CE and the answer's KL are the same with or without the prompt term."""
    model = with_lora(tiny_model("llama"))
    den = Denoiser(model, mask_id=260, shift=True, attention="prompt_causal")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    _, stats = _prompt_kl_loss(den, 1.0)
    assert stats.prompt_kl_tokens == 6 + 4  # prompts of 6 and 4 tokens: all but their first, and each first answer
    assert abs(stats.prompt_kl_sum) < 1e-5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    plain_loss, plain = _prompt_kl_loss(den, 0.0)
    loss, stats = _prompt_kl_loss(den, 2.0)
    assert stats.prompt_kl_sum > 1e-3 and plain.prompt_kl_tokens == 0
    assert (stats.loss_sum, stats.kl_sum) == (plain.loss_sum, plain.kl_sum)
    assert torch.allclose(loss, plain_loss + 2.0 * stats.prompt_kl_sum, atol=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
