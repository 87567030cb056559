"""Sliding-window models (Mistral; Qwen2 with some layers sliding): LAD's own 4-D masks keep the window, and the
prompt and context caches stay exact, on tiny random models whose window (4) is far shorter than the sequences."""

from __future__ import annotations

import math

import pytest
import torch

from lad.modeling.anneal import annealed_allowed
from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.denoiser import Denoiser
from lad.modeling.windows import decoder_mask, layer_windows, window_band
from lad.sampling import STRATEGIES
from lad.scoring import score_denoise, score_elbo

from conftest import (causal_hidden, make_tiny_config, make_tiny_model, random_ids, read_metrics, train_tiny,
                      with_lora)

MASK_ID = 262
WINDOW = 4
ATOL = 1e-5
SLIDING = {"mistral": dict(sliding_window=WINDOW),
           "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)}  # layer 1 slides

pytestmark = pytest.mark.usefixtures("one_thread")


def denoiser(kind: str, shift: bool = True, attention: str = "prompt_causal") -> Denoiser:
    return Denoiser(with_lora(make_tiny_model(kind, seed=2, **SLIDING[kind])), MASK_ID, shift=shift,
                    attention=attention).eval()


def test_layer_windows_of_each_kind_of_config():
    assert layer_windows(make_tiny_config("llama")) == {"full_attention": None}
    assert layer_windows(make_tiny_config("mistral", **SLIDING["mistral"])) == {"full_attention": WINDOW}
    assert layer_windows(make_tiny_config("qwen2", **SLIDING["qwen2"])) == {"full_attention": None,
                                                                             "sliding_attention": WINDOW}
    assert layer_windows(make_tiny_config("qwen2")) == {"full_attention": None}  # use_sliding_window off


def test_window_band_by_hand():
    rows = torch.tensor([[False, False, False, True, True, True]])  # a causal prompt of 3, then the answer
    band = window_band(6, rows, 2)[0].int()
    assert band[2].tolist() == [0, 1, 1, 1, 1, 1]  # causal query 2: keys 1, 2 (q - k < 2); later keys cut elsewhere
    assert band[4].tolist() == [0, 0, 1, 1, 1, 1]  # bidirectional query 4: |q - k| <= 2, transformers' rule


def test_one_mask_for_alike_layers_and_one_per_layer_type_otherwise():
    allowed = torch.ones(1, 6, 6, dtype=torch.bool)
    rows = torch.ones(1, 6, dtype=torch.bool)
    llama = decoder_mask(allowed, rows, make_tiny_config("llama"), torch.float32)
    assert torch.is_tensor(llama) and not llama.any()  # no window: everything allowed (0 = may attend)
    masks = decoder_mask(allowed, rows, make_tiny_config("qwen2", **SLIDING["qwen2"]), torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert not masks["full_attention"].any() and masks["sliding_attention"][0, 0, 5, 0] < 0  # |5 - 0| > 4


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_the_prompt_reads_as_the_sliding_parent_and_the_answer_as_the_bidirectional_path(kind):
    den = denoiser(kind)
    ids = random_ids(2, 14, seed=4)
    mask = torch.ones_like(ids)
    start = torch.tensor([9, 7])
    with torch.no_grad():
        hidden = den.hidden_states(ids, mask, answer_start=start)
        causal = causal_hidden(den, ids, mask)  # transformers' causal sliding-window mask
        # with no prompt every query reads both ways: LAD's mask equals transformers' bidirectional sliding one
        none = den.hidden_states(ids, mask, answer_start=torch.zeros(2, dtype=torch.long))
        den.attention = "bidirectional"
        transformers_path = den.hidden_states(ids, mask)
        den.attention = "prompt_causal"
        ignoring_windows = den.hidden_states(ids, torch.zeros(2, 1, 14, 14))  # a 4-D mask is used as it is
    for row, s in enumerate(start.tolist()):
        torch.testing.assert_close(hidden[row, :s], causal[row, :s], atol=ATOL, rtol=0)
    torch.testing.assert_close(none, transformers_path, atol=ATOL, rtol=0)
    assert (ignoring_windows - transformers_path).abs().max() > 1e-3  # the windows do cut something here


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_scoring_with_the_context_cache_is_exact(kind):
    den = denoiser(kind)
    question = list(b"Q: which colour is the sky at noon? A:")  # 38 tokens, far past the window
    requests = [(question, list(b" blue")), (question, list(b" green!")), (list(b"Name a fruit:"), list(b" pear"))]
    for scorer, options in ((score_denoise, dict(iters=3)), (score_elbo, dict(mc_samples=4, group_ids=[0, 0, 1]))):
        cached = scorer(den, requests, batch_size=2, **options)
        plain = scorer(den, requests, batch_size=2, prefix_cache=False, **options)
        for (a, a_greedy), (b, b_greedy) in zip(cached, plain):
            assert a == pytest.approx(b, abs=1e-4) and a_greedy == b_greedy


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_samplers_with_the_prompt_and_block_caches(kind):
    den = denoiser(kind)
    tokenizer = build_byte_tokenizer()
    prompts = ["Reverse the words: cold ship", "hi"]
    options = dict(max_new_tokens=8, iters=8, seed=1, chat_template="raw")
    fn = STRATEGIES["confidence"]
    uncached = [g.token_ids for g in fn(den, tokenizer, prompts, prefix_cache=False, **options)]
    assert [g.token_ids for g in fn(den, tokenizer, prompts, **options)] == uncached  # prompt cache: exact
    # the block cache freezes the rest of the answer (approximate) but must run: one block is exact
    assert [g.token_ids for g in fn(den, tokenizer, prompts, block_cache=True, block_length=8, **options)] == uncached


def test_annealing_masks_end_at_the_bidirectional_sliding_path():
    den = denoiser("qwen2", shift=False, attention="bidirectional")
    ids = random_ids(2, 14, seed=5)
    mask = torch.ones_like(ids)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    end = decoder_mask(annealed_allowed(mask, 1.0, generators), torch.ones_like(mask, dtype=torch.bool),
                       den.config, torch.float32)  # as lad/finetune.py builds it
    with torch.no_grad():
        torch.testing.assert_close(den.hidden_states(ids, end), den.hidden_states(ids, mask), atol=ATOL, rtol=0)


def test_a_sliding_window_run_anneals_with_a_causal_prompt(tmp_path):
    out = train_tiny(tmp_path / "run", "model.config.model_type=qwen2", "model.config.use_sliding_window=true",
                     f"model.config.sliding_window={WINDOW}", "model.config.max_window_layers=1",
                     "attention=prompt_causal", "shift=true", "anneal_steps=2", "max_steps=3")
    losses = [row["loss"] for row in read_metrics(out) if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
