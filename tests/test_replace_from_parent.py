"""`noise.replace_from: parent`: replacements are the AR parent's plausible mistakes for each slot (its top-k
tokens there other than the right one), not random answer tokens; on tiny models and hand-made candidates."""

from __future__ import annotations

import torch

from conftest import FAST, read_adapter as adapter, stopped_copy, train_tiny as train
from lad.finetune import main
from lad.noise import NoiseConfig, apply_edit, corrupt
from lad.run import load_run
from lad.training.data import make_batch
from lad.training.step import parent_choices

MASK = 3


def test_a_replacement_is_one_of_its_own_slots_candidates():
    n, k = 40, 3
    choices = 1000 + 10 * torch.arange(n)[:, None] + torch.arange(k)  # slot j: 1000+10j .. 1000+10j+2
    x = torch.arange(100, 100 + n)
    apply_edit(x, "replace", 0.5, MASK, choices, torch.Generator().manual_seed(0))
    changed = torch.nonzero(x < 1000).flatten().tolist()
    replaced = [j for j in range(n) if j not in changed]
    assert 10 < len(replaced) < 30
    assert all(int(x[j]) in choices[j].tolist() for j in replaced)


def test_corrupt_takes_each_rows_candidates_in_its_answer_columns():
    rows, width = 6, 24
    ids = torch.arange(100, 100 + rows * width).view(rows, width)
    answer = torch.zeros(rows, width, dtype=torch.bool)
    answer[:, 4:20] = True
    choices = torch.zeros(rows, width, 2, dtype=torch.long)
    choices[answer] = torch.stack([ids[answer] + 5000, ids[answer] + 7000], -1)
    cfg = NoiseConfig(objective="structural", full_mask_share=0.0, mask_rate=0.0, replace_rate=1.0, swap_rate=0.0,
                      duplicate_rate=0.0, span_shift_rate=0.0)
    c = corrupt(ids, answer, torch.full((rows,), 0.6), cfg, MASK, torch.Generator().manual_seed(1),
                replace_choices=choices)
    changed = c.noisy_ids != ids
    assert changed.any() and not (changed & ~answer).any()
    offset = c.noisy_ids[changed] - ids[changed]
    assert set(offset.tolist()) <= {5000, 7000}  # the slot's own candidates, in its own row and column


def test_parent_choices_are_the_parents_likeliest_wrong_tokens(tmp_path):
    from lad.data import Example
    from lad.recipe import load_recipe

    out = train(tmp_path / "run", "max_steps=1", *FAST)
    denoiser, tokenizer, info = load_run(out)
    recipe = load_recipe(str(out / "recipe.yaml"))
    examples = [Example(prompt_ids=[65, 66, 67], answer_ids=[70, 71, 72, 73, 257]),
                Example(prompt_ids=[68, 69], answer_ids=[74, 75, 257])]
    batch = make_batch(examples, recipe, pad_id=0, eos_id=257)
    special = {257, info.mask_token_id}
    choices = parent_choices(denoiser, batch, 4, special, "cpu")
    answer = batch["answer_mask"].bool()
    assert choices.shape == (*answer.shape, 4) and not choices[~answer].any()
    logits = denoiser.parent_logits_at(batch["input_ids"], batch["attention_mask"], answer, batch["position_ids"])
    truth = batch["input_ids"][answer]
    for row, (lp, right) in enumerate(zip(logits, truth)):
        picked = choices[answer][row]
        assert int(right) not in picked.tolist() and not set(picked.tolist()) & special
        allowed = lp.clone()
        allowed[[int(right), *special]] = float("-inf")
        assert set(picked.tolist()) == set(allowed.topk(4).indices.tolist())


def test_training_with_parent_replacements_differs_and_resumes_exactly(tmp_path):
    lever = ["noise.objective=structural", "noise.replace_from=parent", "noise.replace_rate=1.0"]
    plain = adapter(train(tmp_path / "plain", "max_steps=3", "noise.objective=structural", "noise.replace_rate=1.0",
                          *FAST))
    assert any(not torch.equal(plain[key], value) for key, value in adapter(
        train(tmp_path / "three", "max_steps=3", *lever, *FAST)).items())
    whole = train(tmp_path / "whole", "max_steps=4", "save_every=2", "eval_every=0", *lever)
    part = train(stopped_copy(whole, tmp_path / "part", 2, 4), "max_steps=4", "save_every=2", "eval_every=0",
                 "resume_from=latest", *lever)
    a, b = adapter(whole), adapter(part)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_recipe_checks_parent_replacements(capsys):
    from pathlib import Path

    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    assert main([tiny, "noise.replace_from=parent", "lora.enabled=false", "--print-recipe"]) == 2
    assert "noise.replace_from: parent needs LoRA" in capsys.readouterr().err
    assert main([tiny, "noise.replace_from=model", "--print-recipe"]) == 2
    assert "noise.replace_from: expected one of 'pool' | 'parent', got 'model'" in capsys.readouterr().err


def test_block_causal_training_takes_the_parents_candidates_per_block(tmp_path, monkeypatch):
    """Every block of the one-pass layout draws its replacements from its own columns' candidates."""
    import lad.training.blocks as blocks

    seen = []
    original = blocks.corrupt

    def spy(*args, replace_choices=None, **kwargs):
        seen.append(replace_choices)
        return original(*args, replace_choices=replace_choices, **kwargs)

    monkeypatch.setattr(blocks, "corrupt", spy)
    train(tmp_path / "block", "max_steps=2", "attention=block_causal", "block_size=4", "noise.objective=structural",
          "noise.replace_from=parent", *FAST)
    assert seen and all(c is not None and c.shape[-1] == 8 for c in seen)
