"""Block-causal attention and its one-pass training (lad/modeling/attention.py, lad/training/blocks.py).

Checked on tiny random models: the mask by hand; block_size 1 is the causal mask; a block never sees a later block
and sees every token of its own; the one-pass layout gives every supervised token the logits (and so the loss) of
training each block on its own against the clean blocks before it; complementary copies supervise every answer
token once; the recipe key, lad.json and a tiny training run with resume.
"""

from __future__ import annotations

import json

import pytest
import torch

from lad.data import Example, collate
from lad.modeling.attention import answer_start_from, block_causal_allowed
from lad.modeling.denoiser import Denoiser
from lad.noise import Corruption, NoiseConfig
from lad.recipe import RecipeError, load_recipe
from lad.run import LadInfo, load_run
from lad.training.blocks import block_batch

from conftest import TINY_RECIPE, make_tiny_model, read_adapter, read_metrics, stopped_copy, train_tiny, with_lora

MASK_ID = 262
ATOL = 2e-5

pytestmark = pytest.mark.usefixtures("one_thread")


SLIDING = {"llama": {}, "mistral": dict(sliding_window=4),  # windows far shorter than the rows
           "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)}


def denoiser(shift=False, block_size=2, seed=0, kind="llama", attn="sdpa") -> Denoiser:
    model = make_tiny_model(kind, seed=seed, attn_implementation=attn, **SLIDING[kind])
    return Denoiser(with_lora(model, seed), MASK_ID, shift=shift, attention="block_causal",
                    block_size=block_size).eval()


def test_the_mask_by_hand():
    # one padding column, prompt at columns 1-2, answer 3-7 in blocks of 2: {3, 4}, {5, 6}, {7}
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    allowed = block_causal_allowed(attention, torch.tensor([3]), 2).int()[0]
    assert allowed.tolist() == [[0, 0, 0, 0, 0, 0, 0, 0],   # padding query: nothing (finite mask, unread)
                                [0, 1, 0, 0, 0, 0, 0, 0],   # prompt: causal
                                [0, 1, 1, 0, 0, 0, 0, 0],
                                [0, 1, 1, 1, 1, 0, 0, 0],   # block 0: prompt and its own block, both ways
                                [0, 1, 1, 1, 1, 0, 0, 0],
                                [0, 1, 1, 1, 1, 1, 1, 0],   # block 1: prompt, block 0, itself
                                [0, 1, 1, 1, 1, 1, 1, 0],
                                [0, 1, 1, 1, 1, 1, 1, 1]]   # block 2 (one token): everything before it


def test_block_size_one_is_causal():
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    allowed = block_causal_allowed(attention, torch.tensor([4, 2]), 1)
    causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))[None] & attention.bool()[:, None, :]
    assert torch.equal(allowed, causal)


@pytest.mark.parametrize("shift", [False, True])
def test_a_block_sees_its_own_block_and_never_a_later_one(shift):
    den = denoiser(shift=shift, block_size=3)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    start = torch.tensor([3])  # prompt 0-2, blocks {3-5}, {6-8}, {9-11}
    base = den(ids, torch.ones_like(ids), answer_start=start)[0]
    later = ids.clone()
    later[0, 10] = (later[0, 10] + 1) % 256
    changed = den(later, torch.ones_like(ids), answer_start=start)[0]
    unchanged_until = 9 if not shift else 10  # with shift, token 9 is predicted from column 8 (block 1)
    assert torch.allclose(base[:unchanged_until], changed[:unchanged_until], atol=ATOL)
    same_block = ids.clone()
    same_block[0, 8] = (same_block[0, 8] + 1) % 256
    moved = den(same_block, torch.ones_like(ids), answer_start=start)[0]
    token = 6 + int(shift)  # predicted from a column of block 1 (with shift: one to its left)
    assert not torch.allclose(base[token], moved[token], atol=1e-4)  # block 1 sees its own last token


def examples():
    g = torch.Generator().manual_seed(3)
    rows = [(4, 7), (2, 9), (5, 3)]  # (prompt, answer) lengths: partial last blocks, different widths
    return [Example(torch.randint(0, 256, (p,), generator=g).tolist(), torch.randint(0, 256, (a,), generator=g).tolist())
            for p, a in rows]


def one_pass_and_separate(shift: bool, block_size: int, complementary: bool, kind="llama", attn="sdpa"):
    """Logits of every supervised entry from the one-pass layout, and from running its block alone as
    [prompt, clean blocks before it, the noisy block] under block-causal attention."""
    den = denoiser(shift=shift, block_size=block_size, kind=kind, attn=attn)
    batch = collate(examples(), pad_id=0, shift=shift)
    noise = NoiseConfig(objective="mask", complementary=complementary)
    laid = block_batch(batch, noise, block_size, shift, MASK_ID, [11, 12, 13], torch.arange(256))
    mask = den.layout_mask(laid.kind, laid.block, laid.attention_mask, laid.position_ids)
    one_pass = den(laid.input_ids, mask, position_ids=laid.position_ids, sources=laid.sources)
    length = batch["input_ids"].shape[1]
    separate = []
    for n in range(len(laid.targets)):
        row, column = divmod(int(laid.logical[n]), length)
        answer = batch["answer_mask"][row].nonzero().flatten()
        start, end = int(answer[0]), int(answer[-1]) + 1
        first = end + int(laid.copy[n]) * (end - start)  # the copy's first column in the layout
        noisy = laid.input_ids[row, first:first + end - start]
        block_first = start + (column - start) // block_size * block_size
        block_end = min(block_first + block_size, end)
        ids = torch.cat([batch["input_ids"][row, :block_first], noisy[block_first - start:block_end - start]])
        positions = torch.zeros(1, len(ids), dtype=torch.bool)
        positions[0, column] = True
        logits = den(ids[None], torch.ones(1, len(ids), dtype=torch.long), positions=positions,
                     answer_start=torch.tensor([start]))
        separate.append(logits[0])
    return laid, one_pass, torch.stack(separate)


@pytest.mark.parametrize("shift,complementary", [(False, False), (True, False), (True, True)])
def test_one_pass_equals_each_block_alone(shift, complementary):
    laid, one_pass, separate = one_pass_and_separate(shift, block_size=3, complementary=complementary)
    assert len(laid.targets) > 10
    assert torch.allclose(one_pass, separate, atol=ATOL), (one_pass - separate).abs().max()


@pytest.mark.parametrize("kind, attn", [("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa")])
def test_one_pass_equals_each_block_alone_with_sliding_windows_and_eager(kind, attn):
    laid, one_pass, separate = one_pass_and_separate(True, block_size=3, complementary=False, kind=kind, attn=attn)
    assert torch.allclose(one_pass, separate, atol=ATOL), (one_pass - separate).abs().max()


def test_complementary_copies_supervise_every_answer_token_once():
    batch = collate(examples(), pad_id=0, shift=True)
    noise = NoiseConfig(objective="mask", complementary=True)
    laid = block_batch(batch, noise, 4, True, MASK_ID, [1, 2, 3], torch.arange(256))
    answer = batch["answer_mask"].flatten().nonzero().flatten()
    assert sorted(laid.logical.tolist()) == sorted(answer.tolist())
    assert bool(laid.was_masked.all())


def test_noise_is_per_row_and_per_block():
    batch = collate(examples(), pad_id=0)
    noise = NoiseConfig(objective="mask")
    full = block_batch(batch, noise, 2, False, MASK_ID, [5, 6, 7], torch.arange(256))
    alone = block_batch(collate(examples()[1:2], pad_id=0), noise, 2, False, MASK_ID, [6], torch.arange(256))
    row = full.logical // batch["input_ids"].shape[1] == 1
    assert full.targets[row].tolist() == alone.targets.tolist()
    assert torch.allclose(full.weights[row], alone.weights)


def test_recipe_key_and_its_checks():
    recipe = load_recipe(TINY_RECIPE, ["attention=block_causal"])
    from lad import defaults
    assert recipe.block_size == defaults.BLOCK_SIZE  # filled in, so recipe.yaml and lad.json state it
    assert load_recipe(TINY_RECIPE, ["attention=block_causal", "block_size=4"]).block_size == 4
    for overrides, message in [
        (["block_size=4"], "block_size: only attention block_causal has blocks"),
        (["attention=block_causal", "block_size=0"], "block_size"),
        (["noise.complementary=true", "noise.objective=mask"], "noise.complementary: needs attention block_causal"),
        (["attention=block_causal", "noise.complementary=true"], "complementary: needs objective mask"),
        (["attention=block_causal", "anneal_steps=5"], "anneal_steps"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(TINY_RECIPE, overrides)


BLOCK_RUN = ["attention=block_causal", "block_size=4", "shift=true", "noise.objective=mask",
             "noise.complementary=true", "distill_weight=0.5", "prompt_distill_weight=1.0", "max_steps=8",
             "save_every=4", "eval_every=4", "batch_size=4"]


def test_a_block_causal_run_trains_records_its_blocks_and_resumes_bitwise(tmp_path):
    straight = train_tiny(tmp_path / "a", *BLOCK_RUN)
    info = LadInfo.load(straight)
    assert (info.attention, info.block_size) == ("block_causal", 4)
    den, _, _ = load_run(straight)
    assert den.block_causal and den.block_size == 4 and den.prefix_cache_exact
    metrics = [m for m in read_metrics(straight) if "loss" in m]
    assert metrics and all(m["loss"] == m["loss"] and "kl" in m and "prompt_kl" in m for m in metrics)  # both KLs
    assert metrics[-1]["loss"] < metrics[0]["loss"] * 1.5
    assert any("val_loss" in m for m in read_metrics(straight))
    from lad.generate import main as generate
    assert generate(["--model", str(straight), "--prompt", "hi", "--max-new-tokens", "8", "--strategy", "threshold"]) == 0

    resumed = stopped_copy(straight, tmp_path / "b", 4, 8)
    train_tiny(resumed, *BLOCK_RUN, "resume_from=latest")
    a, b = read_adapter(straight), read_adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _prompt_kl(den, batch, laid=None):
    from lad.training.blocks import block_forward_loss
    from lad.training.step import forward_loss

    if laid is not None:
        return block_forward_loss(den, den, laid, batch, "cpu", prompt_distill_weight=1.0,
                                  parent=den.parent_logits_at)[1]
    noisy = torch.where(batch["answer_mask"].bool(), torch.full_like(batch["input_ids"], MASK_ID), batch["input_ids"])
    answer = batch["answer_mask"].bool()
    corruption = Corruption(noisy, answer, answer.float(), torch.ones(len(noisy)), torch.zeros(len(noisy), dtype=bool))
    return forward_loss(den, batch, corruption, MASK_ID, "cpu", prompt_distill_weight=1.0,
                        parent=den.parent_logits_at)[1]


def test_prompt_kl_in_the_one_pass_layout_is_the_prompt_causal_one():
    """The layout keeps the prompt in its own columns, read causally: its KL toward the parent is the one a
    prompt-causal denoiser with the same weights pays (0 with the adapter at zero), whatever the blocks hold."""
    den = denoiser(shift=True, block_size=3)
    batch = collate(examples(), pad_id=0, shift=True)
    batch["answer_start"] = answer_start_from(batch["answer_mask"])
    laid = block_batch(batch, NoiseConfig(objective="mask"), 3, True, MASK_ID, [11, 12, 13], torch.arange(256))
    causal = Denoiser(den.model, MASK_ID, shift=True, attention="prompt_causal").eval()
    with torch.no_grad():
        for name, param in den.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    block, plain = _prompt_kl(den, batch, laid), _prompt_kl(causal, batch)
    assert block.prompt_kl_tokens == plain.prompt_kl_tokens == int(batch["answer_start"].sum())
    assert block.prompt_kl_sum > 1e-3 and abs(block.prompt_kl_sum - plain.prompt_kl_sum) < 1e-5
    with torch.no_grad():
        for name, param in den.model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    assert abs(_prompt_kl(den, batch, laid).prompt_kl_sum) < 1e-5


def test_lad_json_block_size_is_checked(tmp_path):
    from lad.integrity import lad_json_problem
    good = {"base_model": {}, "mask_token": "m", "mask_token_id": 1, "mask_token_added": False, "vocab_size": 9,
            "shift": True, "objective": "mask", "noise": {}, "attention": "block_causal", "block_size": 8}
    assert lad_json_problem(good) is None
    assert "block_size" in lad_json_problem({**good, "block_size": None})
    assert "block_size" in lad_json_problem({**good, "block_size": 0})
    assert json.dumps(good)
