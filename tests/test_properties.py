"""Property-based tests (hypothesis) of the collator and of corrupt() over all three objectives, end to end:
Examples → collate → corrupt. tests/test_noise.py already checks prompt safety and same-seed determinism of
corrupt() on hand-built batches; these add what the training loop relies on:

- collate keeps every sequence whole (ids, lengths, positions), pads only outside it, marks exactly the answer;
- each objective's loss mask and weights follow from its corruption (every changed token is supervised,
  mask rows supervise exactly the masked tokens at 1/(t·n), structural rows every answer token at 1/n);
- a row's corruption depends only on its own generator, never on the rest of the batch or its padding, which
  is what makes grad_accum and multi-process training equal a bigger batch;
- encode_rows, for every row, max_length and truncation policy: no example longer than max_length, no empty
  answer, prompt and answer cut only as the policy says, every row counted once, and the examples collate.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings, strategies as st

from lad.data import Example, collate, encode_rows, prompt_ids
from lad.data.formats import instruction_messages
from lad.modeling.byte_tokenizer import build_byte_tokenizer
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


# ---------------------------------------------------------------- encode_rows: rows → examples

TOKENIZER = build_byte_tokenizer()  # ids are UTF-8 bytes, so lengths follow the text exactly
EOS = TOKENIZER.eos_token_id
TEXT = st.text(alphabet="ab é€\n", max_size=24)  # multi-byte characters: one character, several tokens
LIMITS = st.integers(2, 48)


@st.composite
def rows_of(draw, fmt):
    """(rows, each row's full prompt messages and answer text); some answers empty."""
    rows, parts = [], []
    system = draw(st.one_of(st.none(), TEXT))
    for _ in range(draw(st.integers(1, 6))):
        answer = draw(TEXT)
        if fmt == "instruction":
            row = {"instruction": draw(TEXT), "input": draw(st.one_of(st.none(), TEXT)), "output": answer}
            messages = instruction_messages(row["instruction"], row["input"] or "", system)
        else:
            turns = [{"role": role, "content": draw(TEXT)} for role in ["user", "assistant"] * draw(st.integers(0, 2))]
            row = {"messages": [*turns, {"role": "user", "content": draw(TEXT)},
                                {"role": "assistant", "content": answer}]}
            messages = ([{"role": "system", "content": system}] if system else []) + row["messages"][:-1]
        rows.append(row)
        parts.append((messages, answer))
    return rows, parts, system


def full_ids(messages, answer, fmt, template):
    prompt = prompt_ids(messages, TOKENIZER, chat_template=template, role_prefixes=fmt == "chat")
    return prompt, (list(answer.encode("utf-8")) + [EOS] if answer else [])


@SETTINGS
@given(st.sampled_from(["instruction", "chat"]).flatmap(lambda fmt: st.tuples(st.just(fmt), rows_of(fmt))),
       LIMITS, st.sampled_from(["right", "left", "drop"]), st.booleans())
def test_every_encoded_example_fits_and_keeps_an_answer(drawn, max_length, truncation, template):
    fmt, (rows, parts, system) = drawn
    examples, stats = encode_rows(rows, TOKENIZER, fmt=fmt, max_length=max_length, truncation=truncation,
                                  chat_template=template, system_prompt=system, source_name="rows")
    assert stats.rows == len(rows) == stats.kept + stats.dropped_no_answer + stats.dropped_too_long
    assert stats.kept == len(examples) and stats.truncated <= stats.kept
    kept = {int(e.source.rsplit(":", 1)[1]) - 1: e for e in examples}  # "rows:N", N counted from 1
    truncated = 0
    for i, (messages, answer) in enumerate(parts):
        prompt, full = full_ids(messages, answer, fmt, template)
        fits = len(prompt) + len(full) <= max_length
        example = kept.get(i)
        if example is None:  # dropped: no answer, too long under drop, or the prompt leaves no room
            no_room = truncation == "right" and len(prompt) >= max_length
            assert not full or not fits and (truncation == "drop" or no_room)
            continue
        assert 1 <= len(example.answer_ids) and len(example.prompt_ids) + len(example.answer_ids) <= max_length
        assert example.answer_ids == full[:len(example.answer_ids)]  # answers lose only their end
        if fits:  # nothing cut from a row that fits
            assert (example.prompt_ids, example.answer_ids) == (prompt, full)
            continue
        truncated += 1
        assert truncation != "drop" and len(example.prompt_ids) + len(example.answer_ids) == max_length
        if truncation == "right":
            assert example.prompt_ids == prompt
        else:  # left: the prompt loses its start, and the answer its end only once the prompt is gone
            assert example.prompt_ids == prompt[len(prompt) - len(example.prompt_ids):]
            assert example.answer_ids == full or not example.prompt_ids
    assert stats.truncated == truncated
    if examples:
        batch = collate(examples, TOKENIZER.pad_token_id, pad_to_multiple_of=1)
        assert batch["input_ids"].shape[1] <= max_length
        assert batch["answer_mask"].sum(1).tolist() == [len(e.answer_ids) for e in examples]


@SETTINGS
@given(st.lists(TEXT, min_size=1, max_size=6), LIMITS)
def test_packed_text_is_the_whole_stream_in_full_windows(texts, max_length):
    examples, stats = encode_rows([{"text": t} for t in texts], TOKENIZER, fmt="text", max_length=max_length)
    documents = [list(t.encode("utf-8")) for t in texts if t]
    stream = [token for n, doc in enumerate(documents) for token in ([EOS] if n else []) + doc]
    windows = [e.answer_ids for e in examples]
    assert stats.kept == len(examples) and all(e.prompt_ids == [] for e in examples)
    assert all(len(w) == max_length for w in windows[:-1]) and all(2 <= len(w) <= max_length for w in windows)
    assert [t for w in windows for t in w] == stream[:len(stream) - (len(stream) % max_length == 1)]
