"""Prompt-causal attention: the prompt read causally and blind to the answer, the answer bidirectional.

Checked on tiny random models: the mask itself; that prompt positions equal the causal model's and never see the
answer; that answer positions see everything; padding invariance; that an untrained shift model predicts the first
answer token exactly as the AR parent does; that the prefix cache is exact; the recipe key, lad.json and load_run.
"""

from __future__ import annotations

import json

import pytest
import torch

from lad.modeling.anneal import annealed_allowed
from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.denoiser import Denoiser
from lad.modeling.attention import answer_start_from, prompt_causal_allowed
from lad.run import load_run
from lad.sampling.common import answer_logits, build_canvas, prompt_cache
from lad.scoring.single import score_single_tokens

from conftest import causal_hidden, make_tiny_model, random_ids, train_tiny, with_lora

MASK_ID = 262
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def denoiser(shift=False, lora=True, seed=0) -> Denoiser:
    model = make_tiny_model("llama", seed=seed)
    return Denoiser(with_lora(model, seed) if lora else model, MASK_ID, shift=shift,
                    attention="prompt_causal").eval()


def all_positions(ids):
    return torch.ones_like(ids, dtype=torch.bool)


def test_the_mask_by_hand():
    # row 0: 1 padding column, prompt at columns 1-2, answer from 3; row 1: no padding, answer from 1
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    allowed = prompt_causal_allowed(attention, torch.tensor([3, 1])).int()
    assert allowed[0].tolist() == [[0, 0, 0, 0, 0],   # a padding query sees nothing (finite mask: uniform, unread)
                                   [0, 1, 0, 0, 0],   # prompt: itself and earlier real tokens only
                                   [0, 1, 1, 0, 0],
                                   [0, 1, 1, 1, 1],   # answer: every real token
                                   [0, 1, 1, 1, 1]]
    assert allowed[1].tolist() == [[1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1]] * 4


def test_answer_start_from_the_answer_mask():
    answer = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert answer_start_from(answer).tolist() == [2, 0, 5]


@pytest.mark.parametrize("shift", [False, True])
def test_prompt_positions_are_causal_and_blind_to_the_answer(shift):
    den = denoiser(shift)
    ids = random_ids(2, 10, seed=1)
    mask = torch.ones_like(ids)
    start = torch.tensor([6, 4])
    with torch.no_grad():
        hidden = den.hidden_states(ids, mask, answer_start=start)
        causal = causal_hidden(den, ids, mask)
        changed = ids.clone()
        changed[0, 6:], changed[1, 4:] = 7, 7  # every answer token
        hidden_changed = den.hidden_states(changed, mask, answer_start=start)
        prompt_changed = ids.clone()
        prompt_changed[:, 2] = 9  # a prompt token
        hidden_prompt_changed = den.hidden_states(prompt_changed, mask, answer_start=start)
    for row, s in enumerate(start.tolist()):
        torch.testing.assert_close(hidden[row, :s], causal[row, :s], atol=ATOL, rtol=0)  # the parent's reading
        torch.testing.assert_close(hidden_changed[row, :s], hidden[row, :s], atol=ATOL, rtol=0)  # blind to it
        assert (hidden[row, s:] - causal[row, s:]).abs().max() > 1e-3  # the answer sees ahead
        assert (hidden_prompt_changed[row, s:] - hidden[row, s:]).abs().amax(-1).min() > 1e-4  # and the prompt
    # an answer position sees a later answer token (bidirectional within the answer)
    later = ids.clone()
    later[0, 9] = 11
    with torch.no_grad():
        after = den.hidden_states(later, mask, answer_start=start)
    assert (after[0, 6] - hidden[0, 6]).abs().max() > 1e-4


def test_padding_and_batching_do_not_change_the_logits():
    den = denoiser(shift=True)
    a, b = random_ids(1, 9, seed=2)[0], random_ids(1, 6, seed=3)[0]
    singles = []
    with torch.no_grad():
        for seq, start in ((a, 5), (b, 3)):
            singles.append(den(seq[None], torch.ones(1, len(seq), dtype=torch.long), answer_start=torch.tensor([start])))
        ids = torch.full((2, 9), 258)
        ids[0], ids[1, 3:] = a, b
        attention = torch.ones_like(ids)
        attention[1, :3] = 0
        batched = den(ids, attention, answer_start=torch.tensor([5, 6]))
    torch.testing.assert_close(batched[0, 1:], singles[0][0, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1, 4:], singles[1][0, 1:], atol=ATOL, rtol=0)


def test_answer_start_is_required():
    den = denoiser()
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="answer_start"):
        den(ids, torch.ones_like(ids))


def test_untrained_shift_model_predicts_the_first_answer_token_as_the_parent():
    """No LoRA, shift: the first answer slot is read from the last prompt column, which is causal: the parent.
    (Both through `Denoiser.head`, which keeps the mask token out of the distribution.)"""
    den = denoiser(shift=True, lora=False)
    ids = random_ids(3, 7, seed=4)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding too
    slot = torch.zeros_like(ids, dtype=torch.bool)
    slot[:, 5] = True
    with torch.no_grad():
        lad = den(ids.masked_fill(slot, MASK_ID), attention, positions=slot, answer_start=torch.full((3,), 5))
        parent = den.parent_logits_at(ids, attention, slot)
        lad_requests = score_single_tokens(den, [(ids[0, :5].tolist(), [int(ids[0, 5])])])
    torch.testing.assert_close(lad, parent, atol=ATOL, rtol=0)
    assert lad_requests[0][0] == pytest.approx(float(parent[0].log_softmax(-1)[ids[0, 5]]), abs=1e-5)
    bidirectional = Denoiser(make_tiny_model("llama"), MASK_ID, shift=True).eval()
    with torch.no_grad():
        other = bidirectional(ids.masked_fill(slot, MASK_ID), attention, positions=slot)
    assert (other - parent).abs().max() > 1e-3  # the default attention is not the parent there


@pytest.mark.parametrize("shift", [False, True])
def test_the_prefix_cache_is_exact(shift):
    tokenizer = build_byte_tokenizer()
    den = denoiser(shift)
    for prompts in (["hi", "Reverse the words.\ncold ship", "a"], ["only one"]):
        canvas = build_canvas(tokenizer, prompts, 5, MASK_ID, chat_template="raw")
        canvas.answer[:, 1::2] = 104
        with torch.no_grad():
            cache = prompt_cache(den, canvas)
            assert cache.length == canvas.prompt_width
            cached = answer_logits(den, canvas, cache)
            full = answer_logits(den, canvas)
        torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


def test_annealing_keeps_the_prompt_causal():
    attention = torch.ones(2, 6, dtype=torch.long)
    start = torch.tensor([3, 2])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    allowed = annealed_allowed(attention, 1.0, gens) & prompt_causal_allowed(attention, start)
    assert torch.equal(allowed, prompt_causal_allowed(attention, start))  # at the end: exactly prompt-causal
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    early = annealed_allowed(attention, 0.0, gens) & prompt_causal_allowed(attention, start)
    assert torch.equal(early, torch.ones(2, 6, 6, dtype=torch.bool).tril())  # at the start: the parent's mask


def test_a_run_trains_with_it_and_loads_it(tmp_path):
    out = train_tiny(tmp_path / "run", "attention=prompt_causal", "max_steps=2", "shift=true")
    assert json.loads((out / "lad.json").read_text())["attention"] == "prompt_causal"
    den, _, info = load_run(out)
    assert den.attention == "prompt_causal" and info.attention == "prompt_causal"
    ids = random_ids(1, 8)
    with torch.no_grad():
        logits = den(ids, torch.ones_like(ids), answer_start=torch.tensor([5]))
        default = den(ids, torch.ones_like(ids), answer_start=torch.tensor([0]))  # no prompt: bidirectional
    assert torch.isfinite(logits[0, 1:, :MASK_ID]).all()
    assert (logits[0, 1:6] - default[0, 1:6]).abs().max() > 1e-5


def test_the_recipe_refuses_flash_attention(tmp_path):
    from lad.finetune import main
    from conftest import TINY_RECIPE

    code = main([TINY_RECIPE, f"output_dir={tmp_path / 'x'}", "attention=prompt_causal",
                 "model.attn_implementation=flash_attention_2"])
    assert code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["refine", "confidence", "threshold"])
def test_samplers_cache_the_prompt_by_default_when_exact(name):
    from lad.sampling import STRATEGIES

    tokenizer = build_byte_tokenizer()
    fn = STRATEGIES[name]
    options = dict(max_new_tokens=6, iters=4, seed=1, chat_template="raw")
    for shift in (False, True):
        den = denoiser(shift)
        default = fn(den, tokenizer, ["hi", "Reverse the words."], **options)
        uncached = fn(den, tokenizer, ["hi", "Reverse the words."], prefix_cache=False, **options)
        assert [g.prefix_forwards for g in default] == [1, 1] and [g.prefix_forwards for g in uncached] == [0, 0]
        assert [g.token_ids for g in default] == [g.token_ids for g in uncached]
    bidirectional = Denoiser(make_tiny_model("llama"), MASK_ID).eval()
    assert [g.prefix_forwards for g in fn(bidirectional, tokenizer, ["hi"], **options)] == [0]  # approximate: opt-in
