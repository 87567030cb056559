"""Block K/V cache (Fast-dLLM's dual cache, lad/modeling/cache.py): the rest of the answer frozen while a block
is decoded. Exact right after a refresh and, in a one-layer model, always (a column's keys and values there depend on
its own token and position only, so frozen columns are what a full forward would compute); these tests pin the
mechanism (key order, padding, positions, the shift's extra column) and the samplers' wiring with those facts."""

from __future__ import annotations

import pytest
import torch

from lad.generate_cli import given_options, parse_args
from lad.sampling import strategy_options
from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.cache import refresh_block, window_logits
from lad.modeling.denoiser import Denoiser
from lad.sampling import STRATEGIES

from conftest import make_tiny_model, with_lora

MASK_ID = 262
ATOL = 1e-5
PROMPTS = ["hi", "Reverse the words.\ncold ship", "a"]
pytestmark = pytest.mark.usefixtures("one_thread")


def denoiser(shift: bool, attention: str, layers: int = 2, seed: int = 0) -> Denoiser:
    model = with_lora(make_tiny_model("llama", seed=seed, num_hidden_layers=layers))
    return Denoiser(model, MASK_ID, shift=shift, attention=attention).eval()


def canvas(seed: int = 0, width: int = 6, n: int = 12):
    """Two rows (the second left-padded by 2), `width` prompt columns, `n` answer slots half masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 250, (2, width + n), generator=g)
    ids[:, width + n // 3:] = MASK_ID
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 258, 0
    return ids, mask


def slots(ids, start: int, end: int):
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, start:end] = True
    return positions


CASES = [(shift, attention) for shift in (False, True) for attention in ("bidirectional", "prompt_causal")]


@pytest.mark.parametrize("shift, attention", CASES)
@torch.no_grad()
def test_refresh_is_the_prompt_cached_forward_and_a_window_right_after_it_agrees(shift, attention):
    den, (ids, mask), width = denoiser(shift, attention), canvas(), 6
    prefix = den.prefix_cache(ids[:, :width], mask[:, :width])
    answer = slots(ids, width, ids.shape[1])
    full = den(ids, mask, positions=answer, cache=prefix).view(2, 12, -1)
    for start, end in ((0, 4), (4, 8), (8, 12)):
        block = slots(ids, width + start, width + end)
        logits, cache = refresh_block(den, ids, mask, block, prefix, width + start, width + end)
        torch.testing.assert_close(logits.view(2, end - start, -1), full[:, start:end], atol=ATOL, rtol=0)
        again = window_logits(den, ids, mask, block, cache)
        torch.testing.assert_close(again, logits, atol=ATOL, rtol=0)
        # the frozen columns are all but the window (the shift adds the column before the block)
        assert cache.kv.get_seq_length() == cache.key_mask.shape[1] == ids.shape[1] - (cache.end - cache.start)
        assert cache.end - cache.start == end - start + (shift and not (start == 0 and attention == "prompt_causal"))
    assert prefix.kv.get_seq_length() == prefix.length  # the prompt's cache is left as it was


@pytest.mark.parametrize("shift, attention", CASES)
@torch.no_grad()
def test_one_layer_window_after_the_block_changed_equals_the_full_forward(shift, attention):
    den, (ids, mask), width = denoiser(shift, attention, layers=1), canvas(seed=3), 6
    prefix = den.prefix_cache(ids[:, :width], mask[:, :width])
    start, end = width + 4, width + 8
    block = slots(ids, start, end)
    _, cache = refresh_block(den, ids, mask, block, prefix, start, end)
    changed = ids.clone()
    changed[:, start:end] = torch.randint(10, 250, (2, 4), generator=torch.Generator().manual_seed(9))
    expected = den(changed, mask, positions=block, cache=prefix)
    torch.testing.assert_close(window_logits(den, changed, mask, block, cache), expected, atol=ATOL, rtol=0)
    two = denoiser(shift, attention, layers=2)  # with two layers the frozen columns are stale: not equal
    _, cache = refresh_block(two, ids, mask, block, two.prefix_cache(ids[:, :width], mask[:, :width]), start, end)
    stale = window_logits(two, changed, mask, block, cache)
    assert (stale - two(changed, mask, positions=block, cache=two.prefix_cache(ids[:, :width], mask[:, :width]))
            ).abs().max() > 1e-4


# τ 0.0055: this random model's rows finish their blocks at different forwards, so threshold's rows must wait
OPTIONS = {"confidence": dict(iters=6, block_length=2), "threshold": dict(iters=6, block_length=3, threshold=0.0055)}


@pytest.mark.parametrize("name", ["confidence", "threshold"])
@pytest.mark.parametrize("shift, attention", CASES)
def test_samplers_with_the_block_cache(name, shift, attention):
    tokenizer, fn = build_byte_tokenizer(), STRATEGIES[name]
    options = dict(max_new_tokens=6, seed=1, chat_template="raw", **OPTIONS[name])
    one = denoiser(shift, attention, layers=1)  # exact: the same tokens, step by step, as the prompt cache alone
    plain = fn(one, tokenizer, PROMPTS, **options, prefix_cache=True, trace=True)
    cached = fn(one, tokenizer, PROMPTS, **options, block_cache=True, trace=True)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    assert cached[0].prefix_forwards == 1
    if name == "confidence":  # the same forwards, step by step
        assert [[s.tokens for s in g.steps] for g in cached] == [[s.tokens for s in g.steps] for g in plain]
        assert cached[0].nfe == plain[0].nfe == 6
    else:  # rows that finish a block first wait for the others: more batch forwards, the same answers
        alone = [fn(one, tokenizer, [p], **options, block_cache=True)[0] for p in PROMPTS]
        assert len({g.nfe for g in alone}) > 1 and cached[0].nfe >= plain[0].nfe
        assert [g.token_ids for g in alone] == [g.token_ids for g in cached]
    single = fn(one, tokenizer, PROMPTS, **{**options, "block_length": 6}, block_cache=True)  # one block: exact
    assert [g.token_ids for g in single] == [g.token_ids for g in
                                             fn(one, tokenizer, PROMPTS, **{**options, "block_length": 6})]
    two = denoiser(shift, attention, layers=2)  # approximate; still deterministic, and the same alone or batched
    batch = fn(two, tokenizer, PROMPTS, **options, block_cache=True)
    assert [g.token_ids for g in batch] == [g.token_ids for g in fn(two, tokenizer, PROMPTS, **options,
                                                                        block_cache=True)]
    for prompt, in_batch in zip(PROMPTS, batch):
        assert fn(two, tokenizer, [prompt], **options, block_cache=True)[0].token_ids == in_batch.token_ids


def test_block_cache_needs_the_prompt_cache_and_reaches_the_samplers_from_the_cli():
    with pytest.raises(ValueError, match="prefix_cache=False"):
        STRATEGIES["confidence"](denoiser(False, "bidirectional"), build_byte_tokenizer(), ["hi"], max_new_tokens=4,
                                 iters=4, block_length=2, block_cache=True, prefix_cache=False)
    assert {"block_cache", "prefix_cache"} <= set(strategy_options("confidence")) & set(strategy_options("threshold"))
    assert "block_cache" not in strategy_options("refine")
    assert given_options(parse_args(["--model", "r", "--prompt", "x", "--block-cache"])) == {"block_cache": True}


def test_the_sampling_benchmark_times_and_compares_the_block_cache(tmp_path):
    import json
    import sys
    from pathlib import Path

    from conftest import FAST, train_tiny

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from eval.bench_sampling import main

    run = train_tiny(tmp_path / "run", "max_steps=2", *FAST)
    out = tmp_path / "bench.json"
    assert main(["--model", str(run), "--prompts", "2", "--max-new-tokens", "8", "--iters", "4", "--block-length", "4",
                 "--repeats", "1", "--warmup", "0", "--strategies", "confidence", "--no-quality", "--block-cache",
                 "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ar", "confidence", "confidence+bc"}
    row = results["confidence+bc"]
    assert row["median_nfe_per_batch"] == results["confidence"]["median_nfe_per_batch"] == 4
    assert 0 <= row["agreement"]["identical_tokens"] <= 1 and row["agreement"]["cache_logprob_error"] is None
    assert row["speedup_vs_uncached"] > 0
