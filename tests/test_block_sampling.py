"""Sampling a block-causal run with its exact block cache (lad/modeling/cache.py: `GrowingCache`).

On tiny random models: the cached samplers give exactly the uncached block-causal samplers' output (confidence and
threshold, with and without the shift, carrying the finished block or not, decoding blocks smaller than trained);
every forward after the prompt's runs only the current block (and, carrying, the finished one); a prompt's output
is the same alone or in a batch; NFE counts the forwards spent adding blocks.
"""

from __future__ import annotations

import pytest
import torch

from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.denoiser import Denoiser
from lad.sampling import get_strategy
from lad.sampling.common import render_prompt

from conftest import make_tiny_model, with_lora

MASK_ID = 262
PROMPTS = ["hi", "Reverse the words.\ncold ship", "a"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def denoiser(shift: bool, block_size: int = 4, seed: int = 0, **config) -> Denoiser:
    model = with_lora(make_tiny_model(config.pop("kind", "llama"), seed=seed, **config))
    return Denoiser(model, MASK_ID, shift=shift, attention="block_causal", block_size=block_size).eval()


def run(den, tokenizer, strategy, prompts=PROMPTS, **options):
    options = {"max_new_tokens": 16, "iters": 16, "stop_at_eos": False, "chat_template": False, **options}
    if strategy == "threshold":
        options.setdefault("threshold", 0.006)  # a random tiny model: some slots pass, most do not
    return get_strategy(strategy)(den, tokenizer, prompts, **options)


CASES = [(strategy, shift, carry) for strategy in ("confidence", "threshold") for shift in (False, True)
         for carry in (True, False)]


@pytest.mark.parametrize("strategy, shift, carry", CASES)
def test_the_cached_sampler_gives_the_uncached_output(tokenizer, strategy, shift, carry):
    den = denoiser(shift)
    cached = run(den, tokenizer, strategy, carry=carry)
    uncached = run(den, tokenizer, strategy, prefix_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]
    assert all(len(g.token_ids) for g in cached)


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_exact_with_sliding_windows(tokenizer, strategy):
    den = denoiser(True, kind="mistral", sliding_window=3)  # windows shorter than a prompt
    cached = run(den, tokenizer, strategy)
    assert [g.token_ids for g in cached] == [g.token_ids for g in run(den, tokenizer, strategy, prefix_cache=False)]


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_blocks_smaller_than_trained(tokenizer, strategy):
    den = denoiser(True, block_size=8)
    cached = run(den, tokenizer, strategy, block_length=4)
    uncached = run(den, tokenizer, strategy, block_length=4, prefix_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]
    default = run(den, tokenizer, strategy)  # the trained block (8) unless told otherwise
    assert [g.token_ids for g in default] != [g.token_ids for g in cached]


@pytest.mark.parametrize("carry", [True, False])
def test_each_forward_runs_only_the_current_block(tokenizer, carry, monkeypatch):
    den, widths = denoiser(True), []
    decode = den.decode_into

    def recording(ids, *args, **kwargs):
        widths.append(ids.shape[1])
        return decode(ids, *args, **kwargs)

    monkeypatch.setattr(den, "decode_into", recording)
    out = run(den, tokenizer, "confidence", carry=carry)  # 16 slots in blocks of 4, 4 iterations each
    prompt, rest = widths[0], widths[1:]
    assert prompt == max(len(render_prompt(tokenizer, p, False)) for p in PROMPTS)
    if carry:  # each block's first forward also carries the finished block before it
        assert rest == [4, 4, 4, 4] + [8, 4, 4, 4] * 3
        assert out[0].nfe == 16
    else:  # a finished block is added by a forward of its own, counted in NFE
        assert rest == [4, 4, 4, 4] + [4, 4, 4, 4, 4] * 3
        assert out[0].nfe == 19


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_alone_or_in_a_batch_and_seeded(tokenizer, strategy):
    den = denoiser(True)
    batch = run(den, tokenizer, strategy, temperature=0.8, seed=3)
    for prompt, together in zip(PROMPTS, batch):
        alone = run(den, tokenizer, strategy, prompts=[prompt], temperature=0.8, seed=3)[0]
        assert alone.token_ids == together.token_ids
    again = run(den, tokenizer, strategy, temperature=0.8, seed=3)
    assert [g.token_ids for g in again] == [g.token_ids for g in batch]


def test_a_finished_block_never_changes(tokenizer):
    den = denoiser(False)
    out = run(den, tokenizer, "threshold", trace=True)
    for generation in out:
        for before, after in zip(generation.steps, generation.steps[1:]):
            kept = [b for b, m in zip(before.tokens, before.masked) if not m]
            assert [a for a, b, m in zip(after.tokens, before.tokens, before.masked) if not m] == kept


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("lookahead", [None, 2, 3])
def test_one_pass_scoring_is_the_token_by_token_reveal(shift, lookahead):
    """Also with a lookahead: W masks after the revealed tokens, cut at the block's end (block 3: W=3 pads each
    last block to its full size, W=2 shows fewer masks than the block has), the same in one pass as revealed."""
    from lad.scoring.denoise import score_denoise

    den = denoiser(shift, block_size=3)
    g = torch.Generator().manual_seed(5)
    requests = [(torch.randint(0, 256, (c,), generator=g).tolist(), torch.randint(0, 256, (x,), generator=g).tolist())
                for c, x in [(5, 1), (3, 7), (9, 3), (2, 10), (4, 8)]]
    stats = {}
    fast = score_denoise(den, requests, order="l2r", batch_size=3, stats=stats, lookahead=lookahead)
    slow = score_denoise(den, requests, order="l2r", iters=64, one_pass=False, prefix_cache=False,
                         lookahead=lookahead)
    assert [g for _, g in fast] == [g for _, g in slow]
    assert [lp for lp, _ in fast] == pytest.approx([lp for lp, _ in slow], abs=1e-4)
    assert stats["forward_calls"] == 2 and stats["nfe"] == len(requests)  # one forward per batch of requests
    if lookahead is not None:  # the masks shown changed the numbers (x = 7, 8, 10 end mid-block)
        plain = score_denoise(den, requests, order="l2r")
        assert max(abs(a - b) for (a, _), (b, _) in zip(fast, plain)) > 1e-3


@pytest.mark.parametrize("block_causal", [False, True])
def test_lm_eval_generation_is_batched_and_fits_a_block_causal_canvas(tokenizer, block_causal):
    from lm_eval.api.instance import Instance

    from lad.scoring.harness import LadLM

    den = denoiser(True) if block_causal else Denoiser(with_lora(make_tiny_model("llama")), MASK_ID, shift=True).eval()
    kwargs = [{"until": ["\n\n"], "max_gen_toks": 10}, {"until": "q", "max_gen_toks": 6},
              {"max_gen_toks": 10}, {"until": [], "max_gen_toks": 10, "temperature": 0.7}]
    contexts = ["Question: 2+2=", "The cat ", "a", "Why? "]
    requests = [Instance(request_type="generate_until", doc={}, arguments=(c, k), idx=i)
                for i, (c, k) in enumerate(zip(contexts, kwargs))]

    def generate(batch_size):
        lm = LadLM(denoiser=den, tokenizer=tokenizer, strategy="threshold", iters=4, batch_size=batch_size)
        return lm.generate_until(requests, disable_tqdm=True), lm.nfe

    (batched, nfe_batched), (alone, nfe_alone) = generate(3), generate(1)
    assert batched == alone and nfe_batched < nfe_alone  # the same texts, in fewer forwards
    for text, k in zip(batched, kwargs):
        assert not any(stop and stop in text for stop in ([k["until"]] if isinstance(k.get("until"), str)
                                                          else k.get("until", [])))
    if block_causal:  # 10 tokens asked: a canvas of 3 blocks of 4, the answer cut back to 10 tokens
        seen = []

        def spy(*args, **options):
            seen.append(options["max_new_tokens"])
            out = get_strategy("threshold")(*args, **options)
            seen.append(out)
            return out

        lm = LadLM(denoiser=den, tokenizer=tokenizer, strategy="threshold", iters=4)
        texts = lm._generate(contexts[:2], spy, 10, 0.0)
        assert seen[0] == 12
        assert texts == [tokenizer.decode(g.token_ids[:10], skip_special_tokens=True) for g in seen[1]]
