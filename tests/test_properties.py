"""Property-based tests (hypothesis) of the collator and of corrupt() over all three objectives, end to end:
Examples → collate → corrupt. tests/test_noise.py already checks prompt safety and same-seed determinism of
corrupt() on hand-built batches; these add what the training loop relies on:

- collate keeps every sequence whole (ids, lengths, positions), pads only outside it, marks exactly the answer;
- each objective's loss mask and weights follow from its corruption (every changed token is supervised,
  mask rows supervise exactly the masked tokens at 1/(t·n), structural rows every answer token at 1/n);
- a row's corruption depends only on its own generator, never on the rest of the batch or its padding, which
  is what makes grad_accum and multi-process training equal a bigger batch.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings, strategies as st

from lad.data import Example, collate
from lad.noise import NoiseConfig, corrupt

PAD, MASK = 0, 1
TOKEN = st.integers(2, 60)  # never PAD or MASK
SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def examples(draw, min_rows=1, max_rows=5):
    n = draw(st.integers(min_rows, max_rows))
    return [Example(draw(st.lists(TOKEN, max_size=8)), draw(st.lists(TOKEN, min_size=1, max_size=12)))
            for _ in range(n)]


@st.composite
def configs(draw, objective=None):
    rate = st.floats(0.0, 1.0)
    extra = {"suffix_share": draw(rate)} if "suffix_share" in NoiseConfig.__dataclass_fields__ else {}
    return NoiseConfig(**extra, objective=objective or draw(st.sampled_from(["mask", "structural", "mixed"])),
                       mixed_structural_prob=draw(rate), full_mask_share=draw(rate), mask_rate=draw(rate),
                       replace_rate=draw(rate), swap_rate=draw(rate), duplicate_rate=draw(rate),
                       span_shift_rate=draw(rate), max_span=draw(st.integers(1, 5)), max_shift=draw(st.integers(1, 3)))


def levels_for(draw_levels, n):
    return torch.tensor(draw_levels[:n] + [0.5] * (n - len(draw_levels)), dtype=torch.float32)


LEVELS = st.lists(st.floats(1e-3, 1.0), min_size=5, max_size=5)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- collate


@SETTINGS
@given(examples(), st.sampled_from(["right", "left"]), st.sampled_from([1, 4, 8]), st.booleans())
def test_collate_keeps_every_sequence_whole(batch, side, multiple, shift):
    out = collate(batch, PAD, padding_side=side, pad_to_multiple_of=multiple, shift=shift)
    width = out["input_ids"].shape[1]
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in batch]
    assert width % multiple == 0 and max(lengths) <= width < max(lengths) + multiple
    for row, (example, n) in enumerate(zip(batch, lengths)):
        real = out["attention_mask"][row].bool()
        assert int(real.sum()) == n  # lengths preserved
        assert out["input_ids"][row][real].tolist() == example.prompt_ids + example.answer_ids
        assert (out["input_ids"][row][~real] == PAD).all()
        assert out["position_ids"][row][real].tolist() == list(range(n))
        start = int(real.nonzero()[0]) if n else 0
        assert (side == "right") == (start == 0) or n == width
        answer = out["answer_mask"][row]
        assert not (answer & ~real).any()  # padding is never an answer token
        assert not answer[start:start + len(example.prompt_ids)].any()  # nor is the prompt
        expected = len(example.answer_ids) - (1 if shift and not example.prompt_ids else 0)
        assert int(answer.sum()) == expected
        if expected:
            where = answer.nonzero().flatten()
            assert int(where[-1]) == start + n - 1 and int(where[-1] - where[0]) + 1 == expected  # one span


@SETTINGS
@given(examples(min_rows=2), st.booleans())
def test_collate_row_content_does_not_depend_on_the_batch(batch, left):
    side = "left" if left else "right"
    together = collate(batch, PAD, padding_side=side)
    for row, example in enumerate(batch):
        alone = collate([example], PAD, padding_side=side)
        for key in ("input_ids", "answer_mask", "position_ids"):
            real_t = together["attention_mask"][row].bool()
            real_a = alone["attention_mask"][0].bool()
            assert torch.equal(together[key][row][real_t], alone[key][0][real_a]), key


# ---------------------------------------------------------------- collate → corrupt


@SETTINGS
@given(examples(), configs(), LEVELS, st.lists(st.integers(0, 2**31), min_size=5, max_size=5), st.booleans())
def test_corruption_and_loss_mask_agree(batch, cfg, levels, seeds, shift):
    out = collate(batch, PAD, shift=shift)
    ids, answer = out["input_ids"], out["answer_mask"]
    n_rows = len(batch)
    t = levels_for(levels, n_rows)
    c = corrupt(ids, answer, t, cfg, MASK, gens(seeds[:n_rows]))
    assert c.noisy_ids.shape == ids.shape and c.loss_mask.shape == ids.shape == c.weights.shape
    changed = c.noisy_ids != ids
    assert not (changed & ~answer).any()  # prompt and padding never corrupted
    assert not (changed & ~c.loss_mask).any()  # every corrupted token is supervised
    assert not (c.loss_mask & ~answer).any()
    assert (c.weights[~c.loss_mask] == 0).all() and (c.weights[c.loss_mask] > 0).all()
    for i in range(n_rows):
        n = int(answer[i].sum())
        if n == 0:
            assert not c.loss_mask[i].any()
            continue
        row_loss = c.loss_mask[i]
        if getattr(c, "suffix", None) is not None and c.suffix[i]:  # masked from a cut to the answer's end
            where = row_loss.nonzero().flatten()
            m = len(where)
            assert m >= 1 and int(where[-1]) == int(answer[i].nonzero()[-1]) and int(where[-1] - where[0]) + 1 == m
            assert (c.noisy_ids[i][row_loss] == MASK).all() and not c.structural[i]
            torch.testing.assert_close(c.weights[i][row_loss], torch.full((m,), 1.0 / m))
        elif c.structural[i]:
            assert cfg.objective in ("structural", "mixed")
            assert torch.equal(row_loss, answer[i])  # every answer token, kept or not
            torch.testing.assert_close(c.weights[i][row_loss], torch.full((n,), 1.0 / n))
        else:
            assert cfg.objective in ("mask", "mixed")
            assert torch.equal(row_loss, answer[i] & (c.noisy_ids[i] == MASK))  # exactly the masked tokens
            expected = 1.0 / (float(t[i]) * n)
            torch.testing.assert_close(c.weights[i][row_loss], torch.full((int(row_loss.sum()),), expected))
            assert torch.equal(c.noisy_ids[i][answer[i] & ~row_loss], ids[i][answer[i] & ~row_loss])


@SETTINGS
@given(examples(min_rows=2), configs(), LEVELS, st.lists(st.integers(0, 2**31), min_size=5, max_size=5))
def test_a_rows_noise_depends_only_on_its_generator(batch, cfg, levels, seeds):
    """Batch together vs row alone (different width, no neighbours): same noise on the row's real tokens."""
    pool = torch.tensor(sorted({t for e in batch for t in e.answer_ids}))
    out = collate(batch, PAD)
    t = levels_for(levels, len(batch))
    together = corrupt(out["input_ids"], out["answer_mask"], t, cfg, MASK, gens(seeds[:len(batch)]),
                       replace_pool=pool)
    again = corrupt(out["input_ids"], out["answer_mask"], t, cfg, MASK, gens(seeds[:len(batch)]),
                    replace_pool=pool)
    for field in dataclasses.fields(together):
        a, b = getattr(together, field.name), getattr(again, field.name)
        assert (a is None and b is None) or torch.equal(a, b), field.name  # deterministic under the seeds
    for i, example in enumerate(batch):
        alone_batch = collate([example], PAD, pad_to_multiple_of=1)
        alone = corrupt(alone_batch["input_ids"], alone_batch["answer_mask"], t[i:i + 1], cfg, MASK,
                        gens(seeds[i:i + 1]), replace_pool=pool)
        n = len(example.prompt_ids) + len(example.answer_ids)
        assert torch.equal(together.noisy_ids[i, :n], alone.noisy_ids[0, :n])
        assert torch.equal(together.loss_mask[i, :n], alone.loss_mask[0, :n])
        assert torch.equal(together.weights[i, :n], alone.weights[0, :n])
        assert bool(together.structural[i]) == bool(alone.structural[0])
