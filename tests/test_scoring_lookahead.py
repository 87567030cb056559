"""`score_denoise(..., lookahead=w)`: each reveal shows the text so far and exactly w masks, never the whole tail.

Without it the canvas holds one mask per continuation token, so the model is told the continuation's length and
scores log p(x | c, |x|) instead of log p(x | c). References are computed by hand, one unpadded forward per token,
on tiny random models (bidirectional and prompt-causal, shift on and off), and batches mix lengths and contexts.
"""

import pytest
import torch

from lad.modeling.denoiser import Denoiser
from lad.scoring import score_denoise

from conftest import make_tiny_model, with_lora

MASK_ID = 262
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = list(b"Q: what colour is the sky? A:")
REQUESTS = [(QUESTION, list(b" blue")), (QUESTION, list(b" green!")), (QUESTION, list(b" red")),
            (list(b"Name a fruit:"), list(b" an apple")), (list(b"x"), list(b"yz"))]


def denoiser(shift: bool, attention: str = "bidirectional", seed: int = 1) -> Denoiser:
    return Denoiser(with_lora(make_tiny_model("llama", seed=seed), seed=seed), MASK_ID, shift=shift,
                    attention=attention).eval()


@torch.no_grad()
def by_hand(den, context, continuation, lookahead, quota=1):
    """Σ log p(true token) revealing `quota` tokens per forward, left to right, each forward on context + the
    revealed tokens + max(lookahead, quota) masks, nothing else."""
    total, at = 0.0, 0
    while at < len(continuation):
        take = min(quota, len(continuation) - at)
        ids = torch.tensor([context + continuation[:at] + [MASK_ID] * max(lookahead, quota)])
        positions = torch.zeros_like(ids, dtype=torch.bool)
        positions[0, len(context) + at:len(context) + at + take] = True
        lp = den(ids, positions=positions, answer_start=torch.tensor([len(context)])).float().log_softmax(-1)
        total += float(lp.gather(-1, torch.tensor(continuation[at:at + take])[:, None]).sum())
        at += take
    return total


@pytest.mark.parametrize("attention", ["bidirectional", "prompt_causal"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("lookahead", [1, 3])
def test_each_token_sees_exactly_lookahead_masks(attention, shift, lookahead):
    den = denoiser(shift, attention)
    scored = score_denoise(den, REQUESTS, iters=64, order="l2r", lookahead=lookahead, batch_size=4)
    for (context, continuation), (value, _) in zip(REQUESTS, scored):
        assert value == pytest.approx(by_hand(den, context, continuation, lookahead), abs=ATOL)
    alone = [score_denoise(den, [r], iters=64, lookahead=lookahead)[0] for r in REQUESTS]
    # batched and alone agree to float noise (rounding both to 4 places could split a value at a rounding edge)
    assert [v for v, _ in scored] == pytest.approx([v for v, _ in alone], abs=ATOL)


def test_several_tokens_per_forward_show_at_least_their_quota():
    den = denoiser(shift=True, attention="prompt_causal")
    context, continuation = REQUESTS[3]  # 9 tokens over 3 iterations: 3 per forward, 3 masks shown though w=1
    [(value, _)] = score_denoise(den, [(context, continuation)], iters=3, lookahead=1)
    assert value == pytest.approx(by_hand(den, context, continuation, lookahead=1, quota=3), abs=ATOL)


def test_the_length_of_the_continuation_no_longer_shows():
    """On a model that reads context and continuation alike (bidirectional, no shift), the chain rule splits:
    score(c, ab) = score(c, a) + score(c + a, b) when each token sees w masks; with every continuation slot
    masked (the default) it does not, because `a` is then scored knowing that `b` follows."""
    den = denoiser(shift=False)
    context, continuation = QUESTION, list(b" green!")
    head, tail = continuation[:3], continuation[3:]

    def split_gap(**kw):
        whole = score_denoise(den, [(context, continuation)], iters=64, **kw)[0][0]
        parts = (score_denoise(den, [(context, head)], iters=64, **kw)[0][0]
                 + score_denoise(den, [(context + head, tail)], iters=64, **kw)[0][0])
        return abs(whole - parts)

    assert split_gap(lookahead=2) < ATOL
    assert split_gap() > 1e-3


def test_lookahead_needs_left_to_right():
    den = denoiser(shift=False)
    with pytest.raises(ValueError, match="lookahead"):
        score_denoise(den, REQUESTS[:1], order="confidence", lookahead=2)
    with pytest.raises(ValueError, match="lookahead"):
        score_denoise(den, REQUESTS[:1], lookahead=0)
