"""Multiple-choice scoring: denoise (any-order chain rule), Monte-Carlo ELBO, and the AR parent against lm-eval's `hf`.

Every reference value is computed by hand here from direct `Denoiser` calls on one unpadded sequence.
"""

import pytest
import torch

from lad.modeling.denoiser import Denoiser
from lad.scoring import SCORERS, score_ar, score_denoise, score_elbo
from lad.scoring.batching import length_chunks, pad_batch
from lad.scoring.denoise import num_transfer_tokens
from lad.scoring.elbo import elbo_masks, group_generator

from conftest import make_tiny_model, with_lora

MASK_ID = 262  # <|reserved_special_token_0|> of the byte tokenizer
ATOL = 1e-5


def make_denoiser(shift=False, seed=2):
    """Seed 2: on CTX + CONT3 the most confident slot first is the middle one, so the order is not l2r."""
    return Denoiser(with_lora(make_tiny_model("llama", seed=seed), seed=seed), MASK_ID, shift=shift)


@pytest.fixture(scope="module")
def den():
    return make_denoiser()


@pytest.fixture(scope="module")
def den_shift():
    return make_denoiser(shift=True)


CTX = list(b"Q: the sky is")
CONT3 = list(b" bl")


@torch.no_grad()
def slot_log_probs(den, canvas, slots):
    """log_softmax of the denoiser at `slots` of one unpadded sequence: [len(slots), V]."""
    ids = torch.tensor([canvas])
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, slots] = True
    return den(ids, positions=positions).float().log_softmax(-1)


def reveal_most_confident(den, canvas, target, masked, n):
    """One iteration by hand: reveal the n masked slots of highest max-probability (ties: leftmost).

    Returns (sum of the true tokens' log-probs, all of them argmax, new canvas, still masked)."""
    lp = slot_log_probs(den, canvas, masked)
    confidence = lp.max(-1).values.tolist()
    picked = sorted(range(len(masked)), key=lambda j: (-confidence[j], j))[:n]
    total = sum(float(lp[j, target[masked[j]]]) for j in picked)
    greedy = all(int(lp[j].argmax()) == target[masked[j]] for j in picked)
    canvas = list(canvas)
    for j in picked:
        canvas[masked[j]] = target[masked[j]]
    return total, greedy, canvas, [s for j, s in enumerate(masked) if j not in picked]


def reveal_leftmost(den, canvas, target, masked, n):
    lp = slot_log_probs(den, canvas, masked)
    total = sum(float(lp[j, target[masked[j]]]) for j in range(n))
    greedy = all(int(lp[j].argmax()) == target[masked[j]] for j in range(n))
    canvas = list(canvas)
    for j in range(n):
        canvas[masked[j]] = target[masked[j]]
    return total, greedy, canvas, masked[n:]


# ---------------------------------------------------------------- batching helpers
def test_pad_batch_and_chunks():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert length_chunks([2, 5, 3, 5, 1], 2) == [[1, 3], [2, 0], [4]]
    with pytest.raises(ValueError):
        pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError):
        length_chunks([1], 0)
    assert num_transfer_tokens(7, 3) == [3, 2, 2] and num_transfer_tokens(3, 3) == [1, 1, 1]
    assert set(SCORERS) == {"denoise", "elbo"}


def test_empty_and_invalid_requests(den):
    assert score_denoise(den, []) == [] and score_elbo(den, []) == [] and score_ar(den, []) == []
    for scorer in (score_denoise, score_elbo, score_ar):
        with pytest.raises(ValueError, match="continuation is empty"):
            scorer(den, [(CTX, [])])
    with pytest.raises(ValueError, match="iters"):
        score_denoise(den, [(CTX, CONT3)], iters=0)
    with pytest.raises(ValueError, match="order"):
        score_denoise(den, [(CTX, CONT3)], order="random")
    with pytest.raises(ValueError, match="batch_size"):
        score_elbo(den, [(CTX, CONT3)], batch_size=0)


# ---------------------------------------------------------------- single token: exact, one forward
@pytest.mark.parametrize("mode", ["denoise", "elbo"])
def test_single_token_is_exact_in_one_forward(den, mode):
    lp = slot_log_probs(den, CTX + [MASK_ID], [len(CTX)])[0]
    best = int(lp.argmax())
    requests = [(CTX, [ord("x")]), (CTX, [best])]  # the second is the model's own argmax: greedy
    stats = {}
    if mode == "denoise":
        out = score_denoise(den, requests, iters=16, stats=stats, batch_size=1)
    else:
        out = score_elbo(den, requests, mc_samples=128, stats=stats, batch_size=1)
    assert out[0][0] == pytest.approx(float(lp[ord("x")]), abs=ATOL) and out[0][1] is (best == ord("x"))
    assert out[1][0] == pytest.approx(float(lp[best]), abs=ATOL) and out[1][1] is True
    assert stats == {"nfe": 2, "forward_calls": 2}  # one forward per request


# ---------------------------------------------------------------- denoise by hand
@pytest.mark.parametrize("iters", [3, 16])
def test_denoise_one_token_per_iteration_by_hand(den, iters):
    P = len(CTX)
    canvas, masked = CTX + [MASK_ID] * 3, [P, P + 1, P + 2]
    target = CTX + CONT3
    a, g1, canvas, masked = reveal_most_confident(den, canvas, target, masked, 1)
    assert masked == [P, P + 2]  # the middle slot is the most confident: not left to right
    b, g2, canvas, masked = reveal_most_confident(den, canvas, target, masked, 1)
    c, g3, canvas, masked = reveal_most_confident(den, canvas, target, masked, 1)
    assert masked == [] and canvas == target
    stats = {}
    [(value, greedy)] = score_denoise(den, [(CTX, CONT3)], iters=iters, stats=stats, order="confidence")
    assert value == pytest.approx(a + b + c, abs=ATOL)
    assert greedy is (g1 and g2 and g3)
    assert stats["nfe"] == 3


def test_denoise_fewer_iterations_than_tokens_by_hand(den):
    P = len(CTX)
    target = CTX + CONT3
    # iters=1: all three revealed at once, from one forward
    lp = slot_log_probs(den, CTX + [MASK_ID] * 3, [P, P + 1, P + 2])
    expected = sum(float(lp[j, CONT3[j]]) for j in range(3))
    stats = {}
    [(value, greedy)] = score_denoise(den, [(CTX, CONT3)], iters=1, stats=stats, order="confidence")
    assert value == pytest.approx(expected, abs=ATOL) and stats["nfe"] == 1
    assert greedy is all(int(lp[j].argmax()) == CONT3[j] for j in range(3))
    # iters=2: LLaDA's split [2, 1]
    a, _, canvas, masked = reveal_most_confident(den, CTX + [MASK_ID] * 3, target, [P, P + 1, P + 2], 2)
    b, _, canvas, masked = reveal_most_confident(den, canvas, target, masked, 1)
    [(value, _)] = score_denoise(den, [(CTX, CONT3)], iters=2, order="confidence")
    assert value == pytest.approx(a + b, abs=ATOL)


def test_denoise_left_to_right_by_hand(den):
    P = len(CTX)
    target = CTX + CONT3
    canvas, masked = CTX + [MASK_ID] * 3, [P, P + 1, P + 2]
    a, g1, canvas, masked = reveal_leftmost(den, canvas, target, masked, 1)
    b, g2, canvas, masked = reveal_leftmost(den, canvas, target, masked, 1)
    c, g3, canvas, masked = reveal_leftmost(den, canvas, target, masked, 1)
    [(value, greedy)] = score_denoise(den, [(CTX, CONT3)], iters=8, order="l2r")
    assert value == pytest.approx(a + b + c, abs=ATOL) and greedy is (g1 and g2 and g3)
    assert score_denoise(den, [(CTX, CONT3)], iters=8) == [(value, greedy)]  # left to right is the default
    # the order matters: most-confident-first gives another value on this random model
    [(confident, _)] = score_denoise(den, [(CTX, CONT3)], iters=8, order="confidence")
    assert abs(confident - value) > 1e-4


def test_denoise_with_shift_by_hand(den_shift):
    P = len(CTX)
    target = CTX + CONT3
    canvas, masked = CTX + [MASK_ID] * 3, [P, P + 1, P + 2]
    a, _, canvas, masked = reveal_most_confident(den_shift, canvas, target, masked, 1)
    b, _, canvas, masked = reveal_most_confident(den_shift, canvas, target, masked, 1)
    c, _, canvas, masked = reveal_most_confident(den_shift, canvas, target, masked, 1)
    [(value, _)] = score_denoise(den_shift, [(CTX, CONT3)], iters=3, order="confidence")
    assert value == pytest.approx(a + b + c, abs=ATOL)
    # single token, both modes, and batched with other lengths (left padding) under shift
    lp = slot_log_probs(den_shift, CTX + [MASK_ID], [P])[0]
    requests = [(CTX, [ord("e")]), (CTX[:4], CONT3), (CTX, CONT3)]
    for scorer in (score_denoise, score_elbo):
        out = scorer(den_shift, requests, batch_size=3)
        assert out[0][0] == pytest.approx(float(lp[ord("e")]), abs=ATOL)
    assert score_denoise(den_shift, requests, iters=3, order="confidence")[2][0] == pytest.approx(value, abs=ATOL)
    with pytest.raises(ValueError, match="context is empty"):
        score_denoise(den_shift, [([], CONT3)])


# ---------------------------------------------------------------- batching invariance
MIXED = [(list(b"abc"), list(b"d")), (list(b"Question: why"), list(b" not?")), (list(b"xy"), list(b"zzzzzz")),
         (list(b"hello there"), list(b"!!")), (list(b"q"), list(b"rst")), (list(b"a long context here"), list(b"."))]


@pytest.mark.parametrize("mode", ["denoise", "l2r", "elbo"])
def test_batched_equals_alone(den, mode):
    if mode == "elbo":
        run = lambda reqs, bs, groups: score_elbo(den, reqs, mc_samples=6, seed=3, batch_size=bs, group_ids=groups)
    else:
        order = "confidence" if mode == "denoise" else "l2r"
        run = lambda reqs, bs, groups: score_denoise(den, reqs, iters=4, order=order, batch_size=bs)
    groups = list(range(10, 10 + len(MIXED)))
    batched = run(MIXED, 4, groups)
    alone = [run([r], 1, [g])[0] for r, g in zip(MIXED, groups)]
    for (b, bg), (a, ag) in zip(batched, alone):
        assert b == pytest.approx(a, abs=ATOL) and bg == ag


def test_denoise_counts_forwards_and_reports_progress(den):
    done, stats = [], {}
    score_denoise(den, MIXED, iters=4, batch_size=3, progress=done.append, stats=stats)
    assert sum(done) == len(MIXED)
    assert stats["nfe"] == sum(min(4, len(x)) for _, x in MIXED)  # rows that are done leave the batch
    chunks = length_chunks([len(c) + len(x) for c, x in MIXED], 3)
    assert stats["forward_calls"] == sum(max(min(4, len(MIXED[i][1])) for i in chunk) for chunk in chunks)


# ---------------------------------------------------------------- ELBO
def test_elbo_matches_its_draws_by_hand(den):
    M, P = 4, len(CTX)
    masks = elbo_masks(3, M, group_generator(7, 5))
    losses = []
    for mask in masks.tolist():
        slots = [P + j for j in range(3) if mask[j]]
        canvas = CTX + [MASK_ID if m else t for m, t in zip(mask, CONT3)]
        lp = slot_log_probs(den, canvas, slots)
        nll = -sum(float(lp[n, CONT3[s - P]]) for n, s in enumerate(slots))
        losses.append(nll * 3 / len(slots))
    full = slot_log_probs(den, CTX + [MASK_ID] * 3, [P, P + 1, P + 2])
    stats = {}
    [(value, greedy)] = score_elbo(den, [(CTX, CONT3)], mc_samples=M, seed=7, group_ids=[5], batch_size=3,
                                   stats=stats)
    assert value == pytest.approx(-sum(losses) / M, abs=ATOL)
    assert greedy is bool((full.argmax(-1) == torch.tensor(CONT3)).all())  # one all-masked forward
    assert stats["nfe"] == M + 1


def test_elbo_stratification_of_the_number_of_masks():
    for length, M in [(4, 8), (5, 3), (3, 128), (7, 7)]:
        masks = elbo_masks(length, M, group_generator(0, 1))
        n = masks.sum(-1)
        assert n.min() >= 1 and n.max() <= length
        for k in range(M):  # l_k lies in the k-th stratum
            assert 1 + (k * length) // M <= n[k] <= 1 + -(-((k + 1) * length) // M)
        assert (n[1:] >= n[:-1]).all()
    counts = torch.bincount(elbo_masks(4, 8, group_generator(0, 2)).sum(-1), minlength=5)
    assert counts.tolist() == [0, 2, 2, 2, 2]  # M a multiple of L: each l exactly M / L times
    # positions are uniform given l: each is masked with frequency E[l] / L = 2.5 / 4
    freq = elbo_masks(4, 4000, group_generator(0, 3)).float().mean(0)
    assert torch.allclose(freq, torch.full((4,), 0.625), atol=0.03)


def test_elbo_seeds_and_groups(den):
    requests = [(CTX, CONT3), (CTX, CONT3), (CTX, list(b" gr"))]
    a = score_elbo(den, requests, mc_samples=5, seed=1, group_ids=[0, 0, 0])
    assert a == score_elbo(den, requests, mc_samples=5, seed=1, group_ids=[0, 0, 0])  # deterministic
    assert a[0] == a[1]  # one group: identical draws, identical estimates
    assert score_elbo(den, requests, mc_samples=5, seed=2, group_ids=[0, 0, 0])[0] != a[0]
    b = score_elbo(den, requests, mc_samples=5, seed=1, group_ids=[0, 1, 0])
    assert b[0] == a[0] and b[1] != a[1]  # another group, other draws
    assert torch.equal(elbo_masks(3, 16, group_generator(1, 0)), elbo_masks(3, 16, group_generator(1, 0)))
    with pytest.raises(ValueError):
        score_elbo(den, requests, group_ids=[0])


# ---------------------------------------------------------------- AR parent
@torch.no_grad()
def test_ar_greedy_and_by_hand(den):
    logits = den.parent_logits(torch.tensor([CTX]))[0, -1].float().log_softmax(-1)
    best = int(logits.argmax())
    out = score_ar(den, [(CTX, [best]), (CTX, [ord("z")])])
    assert out[0] == (pytest.approx(float(logits[best]), abs=ATOL), True)
    assert out[1][0] == pytest.approx(float(logits[ord("z")]), abs=ATOL)
    with pytest.raises(ValueError, match="context is empty"):
        score_ar(den, [([], [1])])


def test_ar_equals_lm_eval_hf_model(tmp_path, byte_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    base = make_tiny_model("llama", seed=4)
    base.save_pretrained(tmp_path)  # saved before the Denoiser makes it bidirectional and LoRA wraps it
    byte_tokenizer.save_pretrained(tmp_path)
    den = Denoiser(with_lora(base), MASK_ID)
    lm = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=4)
    pairs = [("Question: 2+2=", " 4"), ("The cat ", "sat on the mat"), ("a", "b"), ("Answer:", " yes"),
             ("x" * 30, " and more text"), ("Why? ", "Because.")]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    expected = lm.loglikelihood(instances, disable_tqdm=True)
    requests = [lm._encode_pair(*p) for p in pairs]  # HFLM's own split: context+continuation encoded whole
    assert requests[1] == (list(b"The cat"), list(b" sat on the mat"))  # trailing space moved over
    stats = {}
    got = score_ar(den, requests, batch_size=4, stats=stats)
    for (value, greedy), (ref, ref_greedy) in zip(got, expected):
        assert value == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    assert stats == {"nfe": 6, "forward_calls": 2}


@pytest.mark.parametrize("shift", [False, True])
def test_single_token_choices_share_one_forward(den, den_shift, shift):
    """MMLU-style: 4 choices × 2 questions of one-token answers cost 2 forwards and equal the per-request scorers."""
    from lad.scoring.single import score_single_tokens

    model = den_shift if shift else den
    contexts = [[5, 6, 7, 8, 9], [11, 12]]
    requests = [(ctx, [tok]) for ctx in contexts for tok in (20, 21, 22, 23)]
    stats: dict = {}
    shared = score_single_tokens(model, requests, stats=stats)
    assert stats["nfe"] == 2 and stats["forward_calls"] == 1
    one_by_one = score_denoise(model, requests, iters=4)
    for (a, ga), (b, gb) in zip(shared, one_by_one):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    stats = {}
    causal = score_single_tokens(model, requests, causal=True, stats=stats)
    assert stats["nfe"] == 2
    for (a, ga), (b, gb) in zip(causal, score_ar(model, requests)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_default_reveals_one_token_per_step(den):
    """The default (lad/defaults.py SCORE_ITERS = None) is the exact chain rule: one token per reveal step,
    whatever the continuation's length, the same as any iters >= L; 2 steps give another number."""
    stats = {}
    exact = score_denoise(den, MIXED, batch_size=4, stats=stats)
    assert stats["nfe"] == sum(len(x) for _, x in MIXED)
    assert exact == score_denoise(den, MIXED, iters=100, batch_size=4)
    assert max(abs(a - b) for (a, _), (b, _) in zip(exact, score_denoise(den, MIXED, iters=2, batch_size=4))) > 1e-3
