"""Per-token log-likelihoods (`per_token` of `score_blocks` and `score_ar`) and eval/token_offsets.py's summary:
the terms are the scorers' own sums taken apart, and the summary's accuracies and groups are worked by hand."""

from __future__ import annotations

import pytest
import torch

from eval.token_offsets import accuracy, summarize, tags_of
from lad.modeling.denoiser import Denoiser
from lad.scoring import score_ar
from lad.scoring.blocks import score_blocks

from conftest import make_tiny_model, with_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def requests_of(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (c,), generator=g).tolist(), torch.randint(0, 256, (x,), generator=g).tolist())
            for c, x in [(4, 1), (3, 7), (6, 10), (2, 5)]]


@pytest.mark.parametrize("scorer", ["blocks", "ar"])
def test_per_token_terms_add_up_to_the_scores(scorer):
    den = Denoiser(with_lora(make_tiny_model("llama", seed=1)), 262, shift=True, attention="block_causal",
                   block_size=3).eval()
    requests, terms = requests_of(), []
    score = score_blocks if scorer == "blocks" else score_ar
    plain = score(den, requests, batch_size=3)
    again = score(den, requests, batch_size=3, per_token=terms)
    assert again == plain  # asking for the terms changes nothing
    assert [len(t) for t in terms] == [len(x) for _, x in requests]
    assert [sum(t) for t in terms] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    assert all(v <= 0 for t in terms for v in t)
    if scorer == "ar":  # by hand: the parent's next-token log-probabilities at the continuation's tokens
        context, continuation = requests[1]
        ids = torch.tensor([context + continuation[:-1]])
        with torch.no_grad():
            log_probs = den.parent_logits(ids, torch.ones_like(ids)).float().log_softmax(-1)[0, -len(continuation):]
        hand = log_probs.gather(-1, torch.tensor(continuation)[:, None])[:, 0].tolist()
        assert terms[1] == pytest.approx(hand, abs=1e-4)


def test_groups_and_accuracy_by_hand():
    assert tags_of(5, 2) == [(0, 0, False), (1, 0, False), (0, 1, False), (1, 1, False), (0, 2, True)]
    assert tags_of(4, 2) == [(0, 0, False), (1, 0, False), (0, 1, True), (1, 1, True)]
    # two documents of two choices; gold is choice 1 in doc 0 and choice 0 in doc 1
    requests = [(0, 0, 1, [], [1, 2]), (0, 1, 1, [], [1, 2]), (1, 0, 0, [], [1, 2]), (1, 1, 0, [], [1, 2])]
    run = [[-1.0, -1.0], [-1.5, -0.9], [-1.0, -3.0], [-1.0, -1.0]]  # doc 0 wrong (-2 > -2.4), doc 1 wrong (-4 < -2)
    parent = [[-1.0, -2.0], [-1.5, -0.9], [-1.0, -0.5], [-1.0, -1.0]]  # doc 0 right, doc 1 right
    assert accuracy(requests, run) == 0.0 and accuracy(requests, parent) == 1.0
    summary = summarize(requests, run, parent, block=2)
    assert summary["acc_run"] == 0.0 and summary["acc_parent"] == 1.0
    # the runs differ only at offset 1: the parent's terms there give the parent's accuracy, at offset 0 nothing
    assert summary["acc_parent_at_offset"] == {"0": 0.0, "1": 1.0}
    assert summary["acc_parent_except_offset0"] == 1.0
    # two-token endings in blocks of 2: one block, the last; the parent's terms there give the parent's accuracy
    assert summary["acc_parent_at_last_block"] == {"earlier": 0.0, "last": 1.0}
    assert summary["by_offset"]["0"] == {"tokens": 4, "delta_gold": 0.0, "delta_other": 0.0}
    # offset 1: gold endings differ by (-0.9 - -0.9) and (-3.0 - -0.5); the others by (-1 - -2) and 0
    assert summary["by_offset"]["1"] == {"tokens": 4, "delta_gold": -1.25, "delta_other": 0.5}
