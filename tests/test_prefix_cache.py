"""Prefix K/V cache: the prompt computed alone once, then only the answer slots against its keys and values.

The cached forward is an approximation of the bidirectional one (the prompt does not see the canvas), and exactly
a full forward whose attention mask forbids the cached prefix's rows from attending to the later columns: that is
what these tests check, on tiny random models, with left-padded prompts of different lengths, shift off and on.
"""

from __future__ import annotations

import pytest
import torch

from lad.generate import generate
from lad.generate_cli import given_options, parse_args
from lad.sampling import strategy_options
from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.cache import PrefixCache
from lad.modeling.denoiser import Denoiser, position_ids_from_mask
from lad.sampling import STRATEGIES
from lad.sampling.common import answer_logits, build_canvas, prompt_cache

from conftest import make_tiny_model, random_ids, with_lora

MASK_ID = 262  # <|reserved_special_token_0|> of the byte tokenizer
ATOL = 1e-5
DIFFUSION = ("refine", "confidence", "threshold")
# different rendered lengths (left padding), and "a" is a 1-token prompt under chat_template="raw"
PROMPTS = ["hi", "Reverse the words.\ncold ship", "a"]


pytestmark = pytest.mark.usefixtures("one_thread")


def denoiser(shift=False, lora=False, attn="sdpa", seed=0) -> Denoiser:
    model = make_tiny_model("llama", seed=seed, attn_implementation=attn)
    return Denoiser(with_lora(model) if lora else model, MASK_ID, shift=shift).eval()


def prefix_blind_mask(attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Additive 4-D mask [B, 1, L, L]: bidirectional, padding columns hidden, and rows < k (the cached prefix)
    do not see columns >= k. A padding row may see itself (else it would see nothing; its output is never read)."""
    batch, length = attention_mask.shape
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = attention_mask[:, None, None, :].bool() & ~((q < k) & (kv >= k))
    allowed = allowed | torch.eye(length, dtype=torch.bool)
    return torch.zeros(batch, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)


def reference(den: Denoiser, ids, mask, positions, k: int) -> torch.Tensor:
    """The full forward in which the first k columns cannot see the rest."""
    return den(ids, prefix_blind_mask(mask, k), positions=positions, position_ids=position_ids_from_mask(mask))


def left_padded(lengths: list[int], n: int, seed: int = 0):
    """(ids, mask, prompt width): prompts of `lengths` real tokens left-padded to the longest, then n slots
    holding a mix of mask tokens and random tokens."""
    width = max(lengths)
    ids = random_ids(len(lengths), width + n, seed=seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :width - length] = 258
        mask[row, :width - length] = 0
    ids[:, width::2] = MASK_ID
    return ids, mask, width


# ---------------------------------------------------------------- the Denoiser


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("lora, attn", [(False, "sdpa"), (True, "sdpa"), (False, "eager")])
def test_cached_logits_equal_the_prefix_blind_full_forward(shift, lora, attn):
    den = denoiser(shift, lora, attn)
    ids, mask, width = left_padded([7, 3, 1, 5], n=6)
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[:, width:] = True
    with torch.no_grad():
        cache = den.prefix_cache(ids[:, :width], mask[:, :width])
        # with shift the last prompt token is not cached: the first slot is predicted from it
        assert cache.length == width - shift and cache.forwards == 1
        cached = den(ids, mask, positions=positions, cache=cache)
        expected = reference(den, ids, mask, positions, cache.length)
        full = den(ids, mask, positions=positions)
        # a subset of the slots, in a different pattern per row
        some = positions & (torch.rand(positions.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
        some[:, width + 1] = True
        cached_some = den(ids, mask, positions=some, cache=cache)
        expected_some = reference(den, ids, mask, some, cache.length)
    assert cached.shape == full.shape == (4 * 6, 266) and torch.isfinite(cached[:, :MASK_ID]).all()
    torch.testing.assert_close(cached, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_some, expected_some, atol=ATOL, rtol=0)
    assert (cached - full).abs().max() > 1e-3  # an approximation: the prompt no longer sees the canvas


def test_answer_logits_with_the_prompt_cache_on_a_canvas():
    tokenizer = build_byte_tokenizer()
    for shift in (False, True):
        den = denoiser(shift, lora=True)
        for prompts in (PROMPTS, PROMPTS[1:2]):  # left-padded, and no padding at all (no mask materialised)
            rows = len(prompts)
            canvas = build_canvas(tokenizer, prompts, 5, MASK_ID, chat_template="raw")
            canvas.answer[:, 1::2] = 104 + torch.arange(rows)[:, None]
            with torch.no_grad():
                cache = prompt_cache(den, canvas)
                got = answer_logits(den, canvas, cache)
                expected = reference(den, canvas.ids, canvas.attention_mask, canvas.positions, cache.length)
            assert got.shape == (rows, 5, 266)
            torch.testing.assert_close(got, expected.view(rows, 5, 266), atol=ATOL, rtol=0)


def test_shift_first_slot_sees_the_canvas():
    """With shift the first slot's prediction comes from the last prompt token, recomputed with the canvas."""
    den = denoiser(shift=True)
    ids, mask, width = left_padded([6, 4], n=4)
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[:, width:] = True
    with torch.no_grad():
        cache = den.prefix_cache(ids[:, :width], mask[:, :width])
        before = den(ids, mask, positions=positions, cache=cache).view(2, 4, -1)
        ids[:, width + 2] = 65  # change a later slot
        after = den(ids, mask, positions=positions, cache=cache).view(2, 4, -1)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-4


def test_the_cache_does_not_grow_and_is_reused_unchanged():
    den = denoiser(shift=False)
    ids, mask, width = left_padded([5, 2], n=4)
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[:, width:] = True
    with torch.no_grad():
        cache = den.prefix_cache(ids[:, :width], mask[:, :width])
        saved = [(layer.keys.clone(), layer.values.clone()) for layer in cache.kv.layers]
        first = den(ids, mask, positions=positions, cache=cache)
        for step in range(3):
            ids[:, width + step] = 70 + step
            den(ids, mask, positions=positions, cache=cache)
            assert cache.kv.get_seq_length() == width
        again = den(left_padded([5, 2], n=4)[0], mask, positions=positions, cache=cache)  # the first canvas
        # a forward that fails inside the model still leaves the prefix alone
        hook = den.causal_lm.get_decoder().layers[1].register_forward_hook(lambda *_: 1 / 0)
        try:
            with pytest.raises(ZeroDivisionError):
                den(ids, mask, positions=positions, cache=cache)
        finally:
            hook.remove()
    assert cache.kv.get_seq_length() == width
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    for layer, (keys, values) in zip(cache.kv.layers, saved):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_cached_forward_refuses_what_it_cannot_compute():
    den = denoiser(shift=True)
    ids, mask, width = left_padded([4, 3], n=3)
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[:, width:] = True
    with torch.no_grad():
        cache = den.prefix_cache(ids[:, :width], mask[:, :width])
        with pytest.raises(ValueError, match="needs `positions`"):
            den(ids, mask, cache=cache)
        inside = positions.clone()
        inside[:, width - 1] = True  # predicted (shift) from column width-2: inside the cache
        with pytest.raises(ValueError, match="cached prefix"):
            den(ids, mask, positions=inside, cache=cache)
        other = ids.clone()
        other[0, width - 2] = 33
        with pytest.raises(ValueError, match="does not start with the cached prefix"):
            den(other, mask, positions=positions, cache=cache)
        # a one-column prompt with shift caches nothing: the forward is the full one
        empty = den.prefix_cache(ids[:, width - 1:width], mask[:, width - 1:width])
        assert isinstance(empty, PrefixCache) and empty.length == 0 and empty.forwards == 0 and empty.kv is None
        short, short_mask = ids[:, width - 1:], mask[:, width - 1:]
        torch.testing.assert_close(den(short, short_mask, positions=positions[:, width - 1:], cache=empty),
                                   den(short, short_mask, positions=positions[:, width - 1:]), atol=0, rtol=0)


# ---------------------------------------------------------------- samplers


class PrefixBlind(torch.nn.Module):
    """The Denoiser run as a full forward with the prefix-blind mask (what the cache computes exactly)."""

    prefix_cache_exact = False  # a bidirectional run's answers to the Denoiser's questions
    block_size = None

    def __init__(self, den: Denoiser, width: int):
        super().__init__()
        self.den, self.k = den, width - den.shift
        self.mask_id, self.shift, self.calls = den.mask_id, den.shift, 0
        self.causal_lm = den.causal_lm  # for eos_token_ids

    def forward(self, ids, attention_mask, positions, **_):
        self.calls += 1
        return reference(self.den, ids, attention_mask, positions, self.k)


SETTINGS = {"refine": dict(iters=4, noise_start=0.5, early_stop=0, temperature=1.0),
            "confidence": dict(iters=4, block_length=3),
            "threshold": dict(iters=4, block_length=3, threshold=1.5)}  # τ > 1: one per forward, NFE fixed


@pytest.mark.parametrize("name", DIFFUSION)
def test_samplers_with_prefix_cache(name):
    tokenizer = build_byte_tokenizer()
    fn, options = STRATEGIES[name], dict(max_new_tokens=6, seed=2, chat_template="raw", **SETTINGS[name])
    for shift in (False, True):
        den = denoiser(shift, lora=True)
        plain = fn(den, tokenizer, PROMPTS, **options, trace=True)
        cached = fn(den, tokenizer, PROMPTS, **options, prefix_cache=True, trace=True)
        again = fn(den, tokenizer, PROMPTS, **options, prefix_cache=True)
        assert [g.token_ids for g in again] == [g.token_ids for g in cached]  # deterministic
        # NFE counts the same forwards; the prompt pass is reported apart
        assert [g.nfe for g in cached] == [g.nfe for g in plain] and cached[0].nfe == 4
        assert [s.nfe for s in cached[0].steps] == list(range(1, cached[0].nfe + 1))
        assert all(g.prefix_forwards == 1 and g.to_dict()["prefix_forwards"] == 1 for g in cached)
        assert all(g.prefix_forwards == 0 and "prefix_forwards" not in g.to_dict() for g in plain)
        # exactly the sampler run on full forwards with the prefix-blind mask
        width = build_canvas(tokenizer, PROMPTS, 6, MASK_ID, chat_template="raw").prompt_width
        blind = PrefixBlind(den, width)
        expected = fn(blind, tokenizer, PROMPTS, **options, trace=True)
        assert [g.token_ids for g in cached] == [g.token_ids for g in expected]
        assert [[s.tokens for s in g.steps] for g in cached] == [[s.tokens for s in g.steps] for g in expected]
        assert blind.calls == cached[0].nfe
    # a prompt samples the same alone or in a batch
    for prompt, in_batch in zip(PROMPTS, cached):
        alone = fn(den, tokenizer, [prompt], **options, prefix_cache=True)[0]
        assert alone.token_ids == in_batch.token_ids


def test_prefix_cache_option_reaches_the_samplers_from_the_cli_and_api():
    for name in DIFFUSION:
        assert "prefix_cache" in strategy_options(name)
    assert "prefix_cache" not in strategy_options("ar")
    args = parse_args(["--model", "runs/x", "--prompt", "hi", "--prefix-cache"])
    assert given_options(args) == {"prefix_cache": True}
    assert "prefix_cache" not in given_options(parse_args(["--model", "runs/x", "--prompt", "hi"]))
    tokenizer = build_byte_tokenizer()
    gens = generate(denoiser(), PROMPTS[:2], tokenizer=tokenizer, strategy="confidence", max_new_tokens=4, iters=4,
                    prefix_cache=True)
    assert [g.prefix_forwards for g in gens] == [1, 1] and gens[0].nfe == 4
