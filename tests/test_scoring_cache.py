"""Scoring with the contexts' K/V computed once (`prefix_cache`): exact for prompt-causal runs, on by default there.

Reference values are the same scorers without the cache, on tiny random prompt-causal models; the requests mix
shared contexts (a question's choices) with continuations of different lengths, so that rows leave the batch
while the cache follows them.
"""

import pytest
import torch

from lad.modeling.cache import KeptContexts, split_rows, stacked
from lad.modeling.denoiser import Denoiser
from lad.scoring import score_denoise, score_elbo
from lad.scoring.batching import context_batch, pad_batch, use_prefix_cache

from conftest import make_tiny_model, with_lora

MASK_ID = 262
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION, OTHER = list(b"Q: what colour is the sky? A:"), list(b"Name a fruit:")
REQUESTS = [(QUESTION, list(b" blue")), (QUESTION, list(b" green!")), (QUESTION, list(b" red")),
            (OTHER, list(b" an apple")), (OTHER, list(b" a pear")), (list(b"x"), list(b"yz"))]


def denoiser(shift: bool, attention: str = "prompt_causal", seed: int = 1) -> Denoiser:
    return Denoiser(with_lora(make_tiny_model("llama", seed=seed), seed=seed), MASK_ID, shift=shift,
                    attention=attention).eval()


def close(cached, plain):
    for (a, ag), (b, bg) in zip(cached, plain):
        assert a == pytest.approx(b, abs=ATOL) and ag == bg


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("order", ["l2r", "confidence"])
def test_denoise_cached_equals_uncached(shift, order):
    den = denoiser(shift)
    stats = {}
    cached = score_denoise(den, REQUESTS, iters=3, order=order, batch_size=4, stats=stats)  # the default: on
    plain = score_denoise(den, REQUESTS, iters=3, order=order, batch_size=4, prefix_cache=False)
    close(cached, plain)
    # chunks of 4 with a question's choices side by side: [Q Q Q OTHER] [OTHER x] -> 2 + 1 contexts run (OTHER's
    # keys and values are kept across the chunk boundary)
    assert stats["prefix_rows"] == 3
    assert stats["nfe"] == sum(min(3, len(x)) for _, x in REQUESTS)  # the reveal steps are unchanged
    alone = [score_denoise(den, [r], iters=3, order=order, prefix_cache=False)[0] for r in REQUESTS]
    close(cached, alone)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_elbo_cached_equals_uncached_and_runs_each_context_once(shift, batch_size):
    den = denoiser(shift)
    groups = [0, 0, 0, 1, 1, 2]
    kwargs = dict(mc_samples=5, seed=3, batch_size=batch_size, group_ids=groups)
    stats = {}
    close(score_elbo(den, REQUESTS, stats=stats, **kwargs), score_elbo(den, REQUESTS, prefix_cache=False, **kwargs))
    # 3 distinct contexts, each run once however many batches its 6 x (M + 1) rows span
    assert stats["prefix_rows"] == 3 and stats["nfe"] == len(REQUESTS) * (5 + 1)


@pytest.mark.parametrize("shift", [False, True])
def test_bidirectional_default_is_off_and_opting_in_approximates(shift):
    den = denoiser(shift, attention="bidirectional")
    assert not use_prefix_cache(den, None) and use_prefix_cache(den, True)
    stats = {}
    plain = score_denoise(den, REQUESTS, iters=3, stats=stats)
    assert "prefix_rows" not in stats
    # with shift the last context column is left out of the cache: "x" keeps no columns at all
    cached = score_denoise(den, REQUESTS, iters=3, prefix_cache=True, batch_size=4)
    close(cached, [score_denoise(den, [r], iters=3, prefix_cache=True)[0] for r in REQUESTS])  # batching-free
    # a cached context no longer sees the continuation: a different (approximate) number, still finite; with
    # shift, "x" has nothing cached (its one column is recomputed with the canvas), so its number is the same
    differs = [abs(a - b) > 1e-6 for (a, _), (b, _) in zip(cached, plain)]
    assert differs == [True] * 5 + [not shift]
    assert all(torch.isfinite(torch.tensor(a)) for a, _ in cached)


def test_context_batch_layout_and_shared_contexts():
    den = denoiser(True)
    pairs = [(QUESTION, list(b" blue")), (list(b"x"), list(b"yz")), (QUESTION, list(b" a"))]
    stats = {}
    batch = context_batch(den, pairs, 0, "cpu", cached=True, stats=stats)
    width = len(QUESTION)
    assert batch.context_width == width and batch.lengths == [5, 2, 2] and stats["prefix_rows"] == 2
    assert batch.ids[0, :width].tolist() == QUESTION and batch.ids[0, width:].tolist() == list(b" blue")
    assert batch.attention_mask[1].tolist() == [0] * (width - 1) + [1, 1, 1] + [0] * 3  # left, then right padding
    assert batch.slots().sum(-1).tolist() == [5, 2, 2] and bool(batch.slots()[:, :width].any()) is False
    assert batch.answer_start.tolist() == [width] * 3
    # rows 0 and 2 share their context's keys and values, row 1 has its own
    keys = batch.cache.kv.layers[0].keys
    assert torch.equal(keys[0], keys[2]) and not torch.equal(keys[0], keys[1])
    assert torch.equal(batch.cache.ids, batch.ids[:, :width]) and batch.cache.last_hidden.shape[0] == 3


def test_prefix_cache_select_is_a_copy_of_those_rows():
    den = denoiser(True)
    batch = context_batch(den, REQUESTS[:4], 0, "cpu", cached=True)
    rows = torch.tensor([3, 0, 0])
    sub = batch.cache.select(rows)
    for layer, whole in zip(sub.kv.layers, batch.cache.kv.layers):
        assert torch.equal(layer.keys, whole.keys[rows]) and torch.equal(layer.values, whole.values[rows])
    assert torch.equal(sub.last_hidden, batch.cache.last_hidden[rows]) and sub.length == batch.cache.length
    with torch.no_grad():  # a forward on the selection leaves the original untouched
        den(batch.ids[rows], batch.attention_mask[rows], positions=batch.slots()[rows], cache=sub)
    assert batch.cache.kv.get_seq_length() == batch.cache.length == sub.kv.get_seq_length()


@pytest.mark.parametrize("shift", [False, True])
def test_split_rows_then_stacked_gives_back_the_cache(shift):
    den = denoiser(shift)
    contexts = [QUESTION, list(b"x"), OTHER]
    ids, mask = pad_batch(contexts, 0, side="left")
    whole = den.prefix_cache(ids, mask)
    pieces = split_rows(whole)
    assert [p.length for p in pieces] == [len(c) for c in contexts] and pieces[1].ids.tolist() == [list(b"x")]
    again = stacked(pieces, 0)
    assert torch.equal(again.ids, whole.ids) and torch.equal(again.attention_mask, whole.attention_mask)
    assert torch.equal(again.last_hidden, whole.last_hidden) if shift else again.last_hidden is None
    real = mask.bool()
    for layer, original in zip(again.kv.layers, whole.kv.layers):
        for part in ("keys", "values"):
            a, b = getattr(layer, part), getattr(original, part)
            assert torch.equal(a.transpose(1, 2)[real], b.transpose(1, 2)[real])  # every real column, bit for bit
            assert not a.transpose(1, 2)[~real].any()  # padding: zeros (masked out of attention anyway)


def test_kept_contexts_compute_only_what_the_previous_batch_lacked():
    den = denoiser(False)
    kept, stats = KeptContexts(), {}
    first = kept.cache_for(den, [tuple(QUESTION), tuple(QUESTION), tuple(OTHER)], 0, "cpu", stats)
    assert stats["prefix_rows"] == 2 and first.ids.shape == (3, len(QUESTION))
    second = kept.cache_for(den, [tuple(OTHER), tuple(b"x")], 0, "cpu", stats)
    assert stats["prefix_rows"] == 3 and second.ids.shape == (2, len(OTHER))  # OTHER kept, "x" computed
    assert set(kept.kept) == {tuple(OTHER), tuple(b"x")}  # QUESTION dropped: context_order never returns to it
    kept.cache_for(den, [tuple(QUESTION)], 0, "cpu", stats)  # any other order stays exact: computed again
    assert stats["prefix_rows"] == 4
