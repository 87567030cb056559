"""Sampling strategies: exact behaviour of refine, confidence (LLaDA), threshold (Fast-dLLM) and the AR parent.

Two tiny runs are trained once for the module (shift off and on). Behaviour that needs known confidences uses a
fake denoiser whose logits for answer slot j are fixed, whatever the canvas holds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lad.finetune import main as finetune
from lad.modeling.denoiser import Denoiser
from lad.run import load_run
from lad.sampling import STRATEGIES, ar, confidence, get_strategy, refine, split_options, threshold
from lad.sampling.common import eos_token_ids, render_prompt, settled
from lad.sampling.confidence import num_transfer_tokens
from lad.sampling.refine import remask_fraction

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hi", "Reverse the order of the words.\ncold ship milk", "Give the first letter of each word.\nfire sun"]
DIFFUSION = ("refine", "confidence", "threshold")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        for name, extra in (("plain", []), ("shift", ["shift=true", "max_steps=5"])):
            argv = ["recipes/tiny.yaml", "max_steps=30", f"output_dir={root / name}", "eval_every=0", "save_every=0"]
            assert finetune(argv + extra) == 0
    return root


@pytest.fixture(scope="module")
def run(runs):
    denoiser, tokenizer, _ = load_run(runs / "plain")
    return denoiser, tokenizer


@pytest.fixture(scope="module")
def shift_run(runs):
    return load_run(runs / "shift")


class FakeDenoiser(nn.Module):
    """Logits for answer slot j are `table[j]` whatever the canvas; counts its forwards."""

    prefix_cache_exact = False  # a bidirectional run's answers to the Denoiser's questions
    block_size = None

    def __init__(self, table: torch.Tensor, mask_id: int):
        super().__init__()
        self.table, self.mask_id, self.shift, self.calls = table, mask_id, False, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, positions=None, **_):
        self.calls += 1
        assert positions is not None and bool((positions.sum(-1) == self.table.shape[0]).all())
        return self.table.repeat(ids.shape[0], 1)


def fake(tokenizer, tokens: list[int], probs: list[float] | None = None) -> FakeDenoiser:
    """Slot j predicts tokens[j] with probability probs[j] (the rest spread evenly over the other ids)."""
    vocab, mask_id = len(tokenizer), tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    probs = probs or [0.9] * len(tokens)
    table = torch.empty(len(tokens), vocab)
    for j, (token, p) in enumerate(zip(tokens, probs)):
        table[j] = math.log((1 - p) / (vocab - 1))
        table[j, token] = math.log(p)
    return FakeDenoiser(table, mask_id)


def masks(steps) -> list[list[bool]]:
    return [s.masked for s in steps]


def committed_at(steps) -> list[int]:
    """For each slot, the iteration at which it stopped being masked (for samplers that never re-mask)."""
    return [next(i for i, s in enumerate(steps) if not s.masked[j]) for j in range(len(steps[0].masked))]


# ---------------------------------------------------------------- every strategy


def test_registry():
    assert set(STRATEGIES) == {"refine", "confidence", "threshold", "ar", "speculative"}
    assert get_strategy("threshold") is threshold
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        get_strategy("nope")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_deterministic_and_batch_equals_single(run, name):
    denoiser, tokenizer = run
    fn = STRATEGIES[name]
    options, _ = split_options(name, dict(max_new_tokens=8, iters=4, block_length=4))
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=50, top_p=0.95)):
        batch = fn(denoiser, tokenizer, PROMPTS, seed=3, **options, **sampling)
        again = fn(denoiser, tokenizer, PROMPTS, seed=3, **options, **sampling)
        assert [g.token_ids for g in batch] == [g.token_ids for g in again]
        for prompt, in_batch in zip(PROMPTS, batch):
            alone = fn(denoiser, tokenizer, [prompt], seed=3, **options, **sampling)[0]
            assert alone.token_ids == in_batch.token_ids, (name, sampling, prompt)
            assert alone.strategy == name and alone.prompt == prompt
    sampled = [fn(denoiser, tokenizer, PROMPTS[:1], seed=s, max_new_tokens=12, iters=6, temperature=1.0)[0].token_ids
               for s in (0, 1)]
    assert sampled[0] != sampled[1]  # the seed matters


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_on_step_and_trace_agree(run, name):
    denoiser, tokenizer = run
    seen = []
    out = STRATEGIES[name](denoiser, tokenizer, PROMPTS[:2], max_new_tokens=8, iters=4, temperature=1.0,
                           on_step=seen.append, trace=True)
    steps = out[0].speculation["rounds"] if name == "speculative" else out[0].nfe  # speculative: a Step a round
    assert len(seen) == steps == len(out[0].steps) and all(len(records) == 2 for records in seen)
    for b in range(2):
        assert [records[b] for records in seen] == out[b].steps
        per_step = 2 if name == "speculative" else 1  # the denoiser drafts, the parent checks
        assert [s.nfe for s in out[b].steps] == list(range(per_step, out[b].nfe + 1, per_step))
        assert [s.iteration for s in out[b].steps] == list(range(steps))


@pytest.mark.parametrize("name", DIFFUSION)
def test_text_is_cut_at_eos(run, name):
    _, tokenizer = run
    ids = tokenizer.encode("ab", add_special_tokens=False) + [tokenizer.eos_token_id] + \
        tokenizer.encode("cd", add_special_tokens=False)
    out = STRATEGIES[name](fake(tokenizer, ids), tokenizer, ["x"], max_new_tokens=len(ids), iters=5)[0]
    assert out.text == "ab" and out.token_ids == ids[:2]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_shift_run_samples_with_the_shifted_denoiser(shift_run, name):
    denoiser, tokenizer, info = shift_run
    assert info.shift and isinstance(denoiser, Denoiser) and denoiser.shift
    calls = []
    forward = denoiser.forward
    denoiser.forward = lambda *args, **kwargs: calls.append(kwargs["positions"]) or forward(*args, **kwargs)
    try:
        out = STRATEGIES[name](denoiser, tokenizer, PROMPTS[:2], max_new_tokens=8, iters=4)
    finally:
        del denoiser.forward
    assert len(out) == 2 and out[0].nfe >= 1
    if name in ("ar", "speculative"):  # the parent (and the drafter's cached forwards) run the decoder directly
        assert not calls
    else:  # every forward went through the shifted Denoiser, never asking it for position 0
        assert len(calls) == out[0].nfe and not any(bool(p[:, 0].any()) for p in calls)


@pytest.mark.parametrize("name, options, option", [
    ("refine", dict(iters=0), "iters"),
    ("confidence", dict(iters=0), "iters"),
    ("threshold", dict(iters=0), "iters"),
    ("confidence", dict(block_length=5), "block_length"),
    ("threshold", dict(block_length=5), "block_length"),
    ("confidence", dict(block_length=4, iters=2), "iters"),
    ("confidence", dict(remask="oops"), "remask"),
    ("refine", dict(remask="oops"), "remask"),
    ("refine", dict(noise_start=2), "noise_start"),
    ("refine", dict(retention="oops"), "retention"),
    ("threshold", dict(threshold=-0.5), "threshold"),
    ("ar", dict(max_new_tokens=0), "max_new_tokens"),
    ("confidence", dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments(run, name, options, option):
    _, tokenizer = run
    options = {"max_new_tokens": 12, "iters": 6, **options}
    with pytest.raises(ValueError, match=option):
        STRATEGIES[name](fake(tokenizer, [97] * 12), tokenizer, ["x"], **options)


# ---------------------------------------------------------------- refine


def test_refine_locked_slots_never_change(run):
    denoiser, tokenizer = run
    for out in refine(denoiser, tokenizer, PROMPTS[:2], max_new_tokens=12, iters=8, temperature=1.0, noise_start=0.8,
                      retention="locked", early_stop=0, trace=True):
        for j in range(12):
            values = [s.tokens[j] for s in out.steps if not s.masked[j]]
            first = next(i for i, s in enumerate(out.steps) if not s.masked[j])
            assert not any(s.masked[j] for s in out.steps[first:]) and len(set(values)) == 1
        assert out.nfe <= 8


def test_refine_editable_slots_never_remasked_but_may_change(run):
    denoiser, tokenizer = run
    changed_kept = False
    for out in refine(denoiser, tokenizer, PROMPTS[:2], max_new_tokens=12, iters=8, temperature=1.0, noise_start=0.8,
                      retention="editable", early_stop=0, trace=True):
        for j in range(12):
            first = next(i for i, s in enumerate(out.steps) if not s.masked[j])
            assert not any(s.masked[j] for s in out.steps[first:])
            changed_kept |= len({s.tokens[j] for s in out.steps[first:]}) > 1
    assert changed_kept


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
@pytest.mark.parametrize("remask", ["random", "confidence"])
def test_refine_masked_count_follows_schedule(run, schedule, remask):
    denoiser, tokenizer = run
    n, iters = 12, 6
    for out in refine(denoiser, tokenizer, PROMPTS[:2], max_new_tokens=n, iters=iters, noise_start=0.7,
                      schedule=schedule, remask=remask, retention="none", early_stop=0, trace=True):
        expected = [min(round(remask_fraction(i, iters, 0.7, schedule) * n), n) for i in range(iters)]
        assert [sum(s.masked) for s in out.steps] == expected
        assert expected[0] > 0 and expected[-1] == 0


def test_refine_noiseless_never_masks(run):
    denoiser, tokenizer = run
    out = refine(denoiser, tokenizer, PROMPTS[:1], max_new_tokens=12, iters=5, noise_start=0.0, early_stop=0,
                 temperature=1.0, trace=True)[0]
    assert out.nfe == 5 and not any(any(s.masked) for s in out.steps)


@pytest.mark.parametrize("early_stop, nfe", [(1, 2), (3, 4), (0, 10)])
def test_refine_early_stop(run, early_stop, nfe):
    _, tokenizer = run
    model = fake(tokenizer, [97, 98, 99, 100])
    out = refine(model, tokenizer, ["x"], max_new_tokens=4, iters=10, noise_start=0.0, early_stop=early_stop,
                 trace=True)[0]
    assert out.nfe == nfe == model.calls == len(out.steps) and out.text == "abcd"


# ---------------------------------------------------------------- confidence (LLaDA)


def test_num_transfer_tokens():
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert num_transfer_tokens(8, 8) == [1] * 8 and sum(num_transfer_tokens(7, 3)) == 7


@pytest.mark.parametrize("block_length, iters", [(None, 4), (4, 6), (6, 4), (4, 3)])
def test_confidence_quota_blocks_and_frozen_commits(run, block_length, iters):
    denoiser, tokenizer = run
    n = 12
    width = block_length or n
    n_blocks = n // width
    steps_per_block = iters // n_blocks
    quotas = num_transfer_tokens(width, steps_per_block) * n_blocks
    for out in confidence(denoiser, tokenizer, PROMPTS[:2], max_new_tokens=n, iters=iters, block_length=block_length,
                          temperature=1.0, stop_at_eos=False, trace=True):
        assert out.nfe == n_blocks * steps_per_block == iters
        counts = [n] + [sum(s.masked) for s in out.steps]
        assert [a - b for a, b in zip(counts, counts[1:])] == quotas and counts[-1] == 0
        for i, step in enumerate(out.steps):
            previous = out.steps[i - 1] if i else None
            new = [j for j in range(n) if not step.masked[j] and (previous is None or previous.masked[j])]
            # left to right: every slot committed now lies in the first block that still had masks
            block = min(j // width for j in range(n) if previous is None or previous.masked[j])
            assert all(j // width == block for j in new)
            # highest confidence first among the masked slots of the block
            waiting = [step.confidence[j] for j in range(n) if step.masked[j] and j // width == block]
            assert all(step.confidence[j] >= max(waiting, default=0.0) for j in new)
            if previous is not None:  # committed tokens never change
                assert all(step.tokens[j] == previous.tokens[j] for j in range(n) if not previous.masked[j])


def test_confidence_random_remask_keeps_quota_but_changes_order(run):
    denoiser, tokenizer = run
    orders = {}
    for remask in ("confidence", "random"):
        out = confidence(denoiser, tokenizer, PROMPTS[:1], max_new_tokens=12, iters=4, remask=remask,
                         stop_at_eos=False, trace=True)[0]
        counts = [12] + [sum(s.masked) for s in out.steps]
        assert [a - b for a, b in zip(counts, counts[1:])] == [3, 3, 3, 3]
        orders[remask] = masks(out.steps)
    assert orders["confidence"] != orders["random"]


def test_confidence_steps_capped_at_block_length(run):
    denoiser, tokenizer = run
    out = confidence(denoiser, tokenizer, PROMPTS[:1], max_new_tokens=4, iters=16, trace=True)[0]
    assert out.nfe == 4 and [sum(s.masked) for s in out.steps] == [3, 2, 1, 0]


def test_confidence_delay_eos(run):
    _, tokenizer = run
    eos, a = tokenizer.eos_token_id, 97
    tokens = [eos, a, eos, a + 1, a + 2, eos, eos, a + 3]
    probs = [0.99 if t == eos else 0.3 + 0.05 * j for j, t in enumerate(tokens)]
    for delay in (False, True):
        out = confidence(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=8, iters=8, block_length=4,
                         delay_eos=delay, stop_at_eos=False, trace=True)[0]
        when = committed_at(out.steps)
        assert max(when[:4]) < min(when[4:])  # blocks left to right
        for block in (range(0, 4), range(4, 8)):
            eos_times = [when[j] for j in block if tokens[j] == eos]
            other_times = [when[j] for j in block if tokens[j] != eos]
            if delay:
                assert max(other_times) < min(eos_times)  # EOS only once nothing else is left
            else:
                assert max(eos_times) < min(other_times)  # the confident EOS would go first
        assert out.text == "" and out.steps[-1].tokens == tokens


def test_confidence_delay_repeats(run):
    _, tokenizer = run
    a, b = 97, 98
    tokens = [a, a, a, b, b, 99, 100, 101]
    probs = [0.5, 0.9, 0.8, 0.4, 0.95, 0.3, 0.35, 0.45]
    plain = confidence(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=8, iters=4,
                       stop_at_eos=False, trace=True)[0]
    assert committed_at(plain.steps) == [1, 0, 1, 2, 0, 3, 3, 2]  # two per forward, most confident first
    out = confidence(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=8, iters=4,
                     delay_repeats=True, stop_at_eos=False, trace=True)[0]
    # a slot repeating the word of the masked slot left of it waits until that one is committed
    assert committed_at(out.steps) == [0, 1, 2, 1, 2, 3, 3, 0] and out.nfe == 4
    assert out.steps[-1].tokens == tokens


# ---------------------------------------------------------------- threshold (Fast-dLLM)


def test_threshold_commits_exactly_slots_above_tau(run):
    _, tokenizer = run
    probs = [0.95, 0.5, 0.91, 0.3, 0.99, 0.89, 0.2, 0.6]
    model = fake(tokenizer, [97 + j for j in range(8)], probs)
    out = threshold(model, tokenizer, ["x"], max_new_tokens=8, iters=8, threshold=0.9, trace=True)[0]
    assert [not m for m in out.steps[0].masked] == [p >= 0.9 for p in probs]
    # then one per iteration (none reaches τ), most confident first
    assert committed_at(out.steps) == [0, 3, 0, 4, 0, 1, 5, 2] and out.nfe == 6 == model.calls
    assert out.text == "abcdefgh"


def test_threshold_at_least_one_and_budget(run):
    denoiser, tokenizer = run
    for out in threshold(denoiser, tokenizer, PROMPTS[:2], max_new_tokens=12, iters=6, block_length=4,
                         threshold=1.01, stop_at_eos=False, trace=True):
        counts = [12] + [sum(s.masked) for s in out.steps]
        assert out.nfe <= 6 and counts[-1] == 0
        # one commit per iteration until the block's last allowed iteration commits the rest
        assert [a - b for a, b in zip(counts, counts[1:])] == [1, 3, 1, 3, 1, 3]
        when = committed_at(out.steps)
        assert max(when[:4]) < min(when[4:8]) <= max(when[4:8]) < min(when[8:])


def test_threshold_zero_commits_a_block_per_forward(run):
    denoiser, tokenizer = run
    assert threshold(denoiser, tokenizer, PROMPTS, max_new_tokens=12, iters=6, threshold=0.0,
                     stop_at_eos=False)[0].nfe == 1
    out = threshold(denoiser, tokenizer, PROMPTS, max_new_tokens=12, iters=6, block_length=4, threshold=0.0,
                    stop_at_eos=False, trace=True)[0]
    assert out.nfe == 3 and [sum(s.masked) for s in out.steps] == [8, 4, 0]


def test_threshold_nfe_within_budget_and_commits_frozen(run):
    denoiser, tokenizer = run
    for out in threshold(denoiser, tokenizer, PROMPTS, max_new_tokens=12, iters=5, temperature=1.0, threshold=0.3,
                         stop_at_eos=False, trace=True):
        assert out.nfe <= 5 and not any(out.steps[-1].masked)
        for previous, step in zip(out.steps, out.steps[1:]):
            assert all(step.tokens[j] == previous.tokens[j] for j in range(12) if not previous.masked[j])
            assert sum(previous.masked) == 0 or sum(step.masked) < sum(previous.masked)


def test_threshold_delay_eos(run):
    _, tokenizer = run
    eos = tokenizer.eos_token_id
    tokens = [eos, 97, eos, 98, 99, eos]
    probs = [0.99, 0.95, 0.99, 0.5, 0.4, 0.99]
    out = threshold(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=6, iters=6, threshold=0.9,
                    delay_eos=True, stop_at_eos=False, trace=True)[0]
    # 0.95 at once; then one per iteration (the most confident left); EOS once nothing else is left
    assert committed_at(out.steps) == [2, 0, 2, 1, 2, 2] and out.nfe == 3
    plain = threshold(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=6, iters=6, threshold=0.9,
                      stop_at_eos=False, trace=True)[0]
    assert committed_at(plain.steps) == [0, 0, 0, 1, 2, 0]


def test_threshold_delay_repeats(run):
    _, tokenizer = run
    tokens = [97, 97, 97, 98, 98, 99, 100, 101]
    probs = [0.5, 0.9, 0.8, 0.4, 0.95, 0.3, 0.35, 0.45]
    plain = threshold(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=8, iters=8, threshold=0.7,
                      stop_at_eos=False, trace=True)[0]
    assert committed_at(plain.steps)[:5] == [1, 0, 0, 3, 0]  # three above τ at once, two of them one word
    out = threshold(fake(tokenizer, tokens, probs), tokenizer, ["x"], max_new_tokens=8, iters=8, threshold=0.7,
                    delay_repeats=True, stop_at_eos=False, trace=True)[0]
    # repeats of a masked left neighbour are not committed by τ, nor forced while anything else is eligible;
    # the block's last allowed forward (the 8th) commits what is left
    assert committed_at(out.steps) == [0, 1, 2, 4, 5, 7, 6, 3] and out.nfe == 8


# ---------------------------------------------------------------- ar (the AR parent)


def test_ar_greedy_matches_manual_loop_and_restores_denoiser(run):
    denoiser, tokenizer = run
    probe = torch.tensor([render_prompt(tokenizer, PROMPTS[1]) + [denoiser.mask_id] * 4])
    before = denoiser(probe, torch.ones_like(probe))
    out = ar(denoiser, tokenizer, PROMPTS[1:2], max_new_tokens=6, trace=True)[0]
    ids = probe[:, :-4]
    manual = []
    for _ in range(6):
        token = int(denoiser.parent_logits(ids, torch.ones_like(ids))[0, -1].argmax())
        manual.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    eos = eos_token_ids(tokenizer, denoiser)
    cut = next((i for i, t in enumerate(manual) if t in eos), len(manual))
    assert out.token_ids == manual[:cut] and out.nfe == min(cut + 1, 6)
    assert [len(s.tokens) for s in out.steps] == list(range(1, out.nfe + 1))
    assert not any(any(s.masked) for s in out.steps)
    assert out.steps[-1].tokens[:cut] == manual[:cut]
    assert denoiser.config.is_causal is False
    torch.testing.assert_close(denoiser(probe, torch.ones_like(probe)), before, rtol=0, atol=0)


# ---------------------------------------------------------------- stop_at_eos (confidence, threshold)


def test_settled_rows():
    eos, m = torch.tensor([2]), 9
    answer = torch.tensor([[5, 2, m, m], [5, m, 2, m], [m, m, m, m], [2, 7, 7, m], [5, 6, 7, 8]])
    # an EOS with every slot before it committed; a masked slot before the first EOS keeps the text open
    assert settled(answer, eos, m).tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
@pytest.mark.parametrize("block_length", [None, 2])
def test_stop_at_eos_same_text_fewer_forwards(run, strategy, block_length):
    _, tokenizer = run
    eos = tokenizer.eos_token_id
    tokens = [97, 98, eos, 99, 100, 101, 102, 103]  # the text ends at slot 2
    probs = [0.8, 0.7, 0.6, 0.5, 0.95, 0.4, 0.3, 0.2]  # slot 4 is the most confident: it commits first
    sample = get_strategy(strategy)
    runs = {}
    for stop in (False, True):
        model = fake(tokenizer, tokens, probs)
        options, _ = split_options(strategy, dict(max_new_tokens=8, iters=8, block_length=block_length,
                                                  threshold=0.9, stop_at_eos=stop, trace=True))
        out = sample(model, tokenizer, ["x"], **options)[0]
        runs[stop] = (out, model.calls)
    full, early = runs[False][0], runs[True][0]
    assert early.text == full.text == "ab" and early.token_ids == full.token_ids
    assert full.nfe == runs[False][1] and early.nfe == runs[True][1] and len(early.steps) == early.nfe
    # one commit per forward: slots 4, 0, 1, 2 without blocks (the EOS at 2 settles the text); in blocks of two
    # 0, 1, then 2 first in the second block
    assert early.nfe == (4 if block_length is None else 3)
    assert full.nfe == 8 and early.steps == full.steps[:early.nfe]


def test_stop_at_eos_batch_waits_for_every_row(run):
    denoiser, tokenizer = run
    kwargs = dict(max_new_tokens=12, iters=12, block_length=4, trace=True)
    for sample in (confidence, threshold):
        full = sample(denoiser, tokenizer, PROMPTS, stop_at_eos=False, **kwargs)
        early = sample(denoiser, tokenizer, PROMPTS, **kwargs)
        assert [g.text for g in early] == [g.text for g in full]
        assert all(g.nfe <= f.nfe for g, f in zip(early, full))
