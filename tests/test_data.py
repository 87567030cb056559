"""Data pipeline: readers, encoding (formats, truncation, dropping), collation and batch order.

The byte tokenizer makes every expectation exact: text ids are its UTF-8 bytes; bos/eos/pad are 256/257/258 and
<|system|>/<|user|>/<|assistant|> are 259/260/261.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lad.data import DataError, Example, batch_indices, collate, encode_rows, find_token, load_rows, prompt_ids
from lad.modeling.byte_tokenizer import build_byte_tokenizer

BOS, EOS, PAD, SYSTEM, USER, ASSISTANT = 256, 257, 258, 259, 260, 261


def b(text):
    return list(text.encode("utf-8"))


def turn(role_id, text):
    return [role_id, *b(text), EOS]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    tok = build_byte_tokenizer()
    tok.chat_template = None
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def encode(rows, tok, **kw):
    kw.setdefault("fmt", "instruction")
    kw.setdefault("max_length", 64)
    return encode_rows(rows, tok, **kw)


# ---------------------------------------------------------------- instruction / chat / text formats


def test_instruction_row_renders_chat_template(tok):
    (ex,), stats = encode([{"instruction": "hi", "output": "yo"}], tok)
    expected = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    assert ex.prompt_ids == expected["input_ids"] == [USER, *b("hi"), EOS, ASSISTANT]
    assert ex.answer_ids == b("yo") + [EOS]
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_no_answer) == (1, 1, 0, 0)


def test_input_is_appended_after_blank_line(tok):
    (ex,), _ = encode([{"instruction": "do", "input": "this", "output": "ok"}], tok)
    assert ex.prompt_ids == [USER, *b("do\n\nthis"), EOS, ASSISTANT]
    (ex,), _ = encode([{"instruction": "do", "input": "", "output": "ok"}], tok)
    assert ex.prompt_ids == [USER, *b("do"), EOS, ASSISTANT]


def test_field_remapping(tok):
    rows = [{"question": "1+1?", "answer": "2"}]
    (ex,), _ = encode(rows, tok, fields={"instruction": "question", "output": "answer"})
    assert ex.prompt_ids == turn(USER, "1+1?") + [ASSISTANT]
    assert ex.answer_ids == b("2") + [EOS]
    with pytest.raises(ValueError, match="questoin"):
        encode(rows, tok, fields={"questoin": "question"})


def test_system_prompt(tok):
    (ex,), _ = encode([{"instruction": "hi", "output": "yo"}], tok, system_prompt="Be brief.")
    assert ex.prompt_ids == turn(SYSTEM, "Be brief.") + turn(USER, "hi") + [ASSISTANT]


def test_plain_text_prompt_without_chat_template(tok, plain_tok):
    row = [{"instruction": "hi", "input": "x", "output": "yo"}]
    for t, template in ((plain_tok, "auto"), (tok, False)):
        (ex,), _ = encode(row, t, chat_template=template)
        assert ex.prompt_ids == [BOS, *b("hi\n\nx\n")]
        assert ex.answer_ids == b("yo") + [EOS]
    with pytest.raises(ValueError, match="no chat template"):
        encode(row, plain_tok, chat_template=True)


def test_custom_template_string(tok):
    (ex,), _ = encode([{"instruction": "hi", "output": "yo"}], tok, chat_template="Q: {{ messages[0]['content'] }}\nA:")
    assert ex.prompt_ids == b("Q: hi\nA:")


def test_chat_rows(tok, plain_tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    (ex,), _ = encode([{"messages": messages}], tok, fmt="chat")
    assert ex.prompt_ids == turn(SYSTEM, "S") + turn(USER, "a") + turn(ASSISTANT, "b") + turn(USER, "c") + [ASSISTANT]
    assert ex.answer_ids == b("d") + [EOS]
    (ex,), _ = encode([{"conv": messages[1:3]}], plain_tok, fmt="chat", fields={"messages": "conv"})
    assert ex.prompt_ids == [BOS, *b("user: a\nassistant: ")]
    assert ex.answer_ids == b("b") + [EOS]


def test_prompt_ids_matches_training(tok, plain_tok):
    messages = [{"role": "user", "content": "hi"}]
    (ex,), _ = encode([{"instruction": "hi", "output": "yo"}], tok)
    assert prompt_ids(messages, tok) == ex.prompt_ids
    (ex,), _ = encode([{"messages": [*messages, {"role": "assistant", "content": "yo"}]}], plain_tok, fmt="chat")
    assert prompt_ids(messages, plain_tok, role_prefixes=True) == ex.prompt_ids


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "last message must be the assistant"),
        ([{"role": "assistant", "content": "a"}], "at least 2 messages"),
        ("not a list", "at least 2 messages"),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 2"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "message 2"),
    ],
)
def test_chat_bad_structure_names_row(tok, tmp_path, messages, problem):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError, match=problem) as err:
        encode(load_rows(path), tok, fmt="chat")
    assert f"{path}:2" in str(err.value)


def test_text_packing(tok):
    rows = [{"text": "abcde"}, {"text": ""}, {"text": "fgh"}, {"body": "ignored", "text": "ij"}]
    examples, stats = encode(rows, tok, fmt="text", max_length=4)
    stream = b("abcde") + [EOS] + b("fgh") + [EOS] + b("ij")  # 12 tokens, empty doc skipped
    assert [e.answer_ids for e in examples] == [stream[0:4], stream[4:8], stream[8:12]]
    assert all(e.prompt_ids == [] for e in examples)
    assert (stats.rows, stats.kept) == (4, 3)
    assert stats.summary() == "data: 4 rows packed into 3 windows"
    assert [e.source for e in examples] == ["data:1", "data:1-3", "data:3-4"]
    batch = collate(examples, PAD)
    assert batch["answer_mask"].sum().item() == 12


def test_text_packing_last_window(tok):
    examples, _ = encode([{"text": "abcdefghi"}], tok, fmt="text", max_length=4)
    assert [len(e.answer_ids) for e in examples] == [4, 4]  # the 1-token tail is dropped
    examples, _ = encode([{"body": "abcdefghij"}], tok, fmt="text", max_length=4, fields={"text": "body"})
    assert [len(e.answer_ids) for e in examples] == [4, 4, 2]  # a 2-token tail is kept, unpadded


# ---------------------------------------------------------------- truncation and dropping

# prompt = [USER, 10 bytes, EOS, ASSISTANT] = 13 tokens; answer = 6 bytes + EOS = 7 tokens; total 20
LONG = {"instruction": "p" * 10, "output": "a" * 6}


def test_fits_exactly_is_not_truncated(tok):
    (ex,), stats = encode([LONG], tok, max_length=20)
    assert (len(ex.prompt_ids), len(ex.answer_ids), stats.truncated) == (13, 7, 0)


def test_truncation_right(tok):
    (ex,), stats = encode([LONG], tok, max_length=16)
    assert (len(ex.prompt_ids), len(ex.answer_ids)) == (13, 3)
    assert ex.answer_ids == b("aaa")  # the eos was cut
    assert stats.truncated == 1
    _, stats = encode([LONG], tok, max_length=13)  # the prompt fills max_length
    assert (stats.kept, stats.dropped_no_answer, stats.truncated) == (0, 1, 0)


def test_truncation_left(tok):
    (ex,), stats = encode([LONG], tok, max_length=16, truncation="left")
    assert ex.prompt_ids == [*b("ppppppp"), EOS, ASSISTANT]  # start of the prompt dropped
    assert ex.answer_ids == b("aaaaaa") + [EOS]
    assert stats.truncated == 1
    (ex,), _ = encode([LONG], tok, max_length=5, truncation="left")  # answer alone is too long
    assert (ex.prompt_ids, ex.answer_ids) == ([], b("aaaaa"))


def test_truncation_drop(tok):
    examples, stats = encode([LONG, {"instruction": "p", "output": "a"}], tok, max_length=16, truncation="drop")
    assert len(examples) == 1 and examples[0].answer_ids == [97, EOS]
    assert (stats.rows, stats.kept, stats.dropped_too_long, stats.truncated) == (2, 1, 1, 0)


def test_bad_truncation_and_format(tok):
    with pytest.raises(ValueError, match="'middle'"):
        encode([LONG], tok, truncation="middle")
    with pytest.raises(ValueError, match="'alpaca'"):
        encode([LONG], tok, fmt="alpaca")


def test_dropped_rows_are_counted(tok, tmp_path):
    rows = [
        {"instruction": "i", "output": "o"},
        {"instruction": "i", "output": ""},  # no answer tokens
        {"instruction": "p" * 40, "output": "o"},  # the prompt fills max_length
        LONG,  # truncated
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    examples, stats = encode(load_rows(path), tok, max_length=16, source_name="alpaca.jsonl")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert (stats.rows, stats.kept, stats.dropped_no_answer, stats.truncated) == (4, 2, 2, 1)
    assert stats.summary() == "alpaca.jsonl: 4 rows, 2 kept, 2 dropped (no answer tokens left), 1 truncated"


# ---------------------------------------------------------------- reading files and their errors


def test_jsonl_skips_blank_lines_but_keeps_line_numbers(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n  \n{"instruction": "c"}\n', encoding="utf-8")
    rows = load_rows(str(path))
    assert len(rows) == 2
    with pytest.raises(DataError, match=r"d\.jsonl:4: missing field 'output'"):
        encode(rows, tok)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2,}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_rows(str(path))


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        load_rows(str(path))


def test_missing_and_non_string_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"f\.jsonl:2: missing field 'output'"):
        encode(load_rows(path), tok)
    path = write_jsonl(tmp_path / "g.jsonl", [{"instruction": ["a"], "output": "b"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'instruction' must be a string, got list"):
        encode(load_rows(path), tok)


def test_non_utf8_files(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_rows(str(path))
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"latin\.txt:1: not valid UTF-8"):
        load_rows(str(path))


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.json has no rows"):
        load_rows(str(tmp_path / "empty.json"))
    (tmp_path / "d.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type"):
        load_rows(str(tmp_path / "d.csv"))


def test_json_readers(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "dict.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    assert load_rows(str(tmp_path / "list.json")) == rows
    assert load_rows(str(tmp_path / "dict.json"), max_rows=2) == rows[:2]
    (tmp_path / "bad.json").write_text('[{"text": "a"}, 3]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:2: item 2 is not a JSON object"):
        load_rows(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text('[\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:2: malformed JSON"):
        load_rows(str(tmp_path / "broken.json"))


def test_parquet_txt_and_max_rows(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    assert load_rows(str(tmp_path / "d.parquet"), max_rows=1) == rows[:1]
    (tmp_path / "book.txt").write_text("line 1\nline 2\n", encoding="utf-8")
    assert load_rows(str(tmp_path / "book.txt"), text_field="body") == [{"body": "line 1\nline 2\n"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows * 3)
    assert load_rows(path, max_rows=3) == (rows * 3)[:3]


def test_separator_splits_text_into_documents(tok, tmp_path):
    """TinyStories' text files join stories with <|endoftext|>: one row per story, packed with EOS between
    them instead of the literal string; max_rows counts stories; each row keeps the line it starts on."""
    path = tmp_path / "stories.txt"
    path.write_text("First story.\nStill first.\n<|endoftext|>\nSecond.\n<|endoftext|>\n\n<|endoftext|>Third.\n")
    rows = load_rows(str(path), separator="<|endoftext|>")
    assert [r["text"] for r in rows] == ["First story.\nStill first.", "Second.", "Third."]
    assert [rows.where(i) for i in range(3)] == [f"{path}:1", f"{path}:4", f"{path}:7"]
    assert [r["text"] for r in load_rows(str(path), separator="<|endoftext|>", max_rows=2)] == [
        "First story.\nStill first.", "Second."]
    examples, _ = encode_rows(rows, tok, fmt="text", max_length=1000)
    ids = examples[0].answer_ids
    assert ids.count(tok.eos_token_id) == 2 and b"endoftext" not in bytes(i for i in ids if i < 256)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": "a<|endoftext|>b"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'text' must be a string"):
        load_rows(str(jsonl), separator="<|endoftext|>")


def test_separator_needs_text_format():
    from lad.recipe import RecipeError, from_dict

    base = {"model": {"name_or_path": "m"}, "max_steps": 1,
            "data": {"train": [{"path": "a.txt", "separator": "<|endoftext|>"}]}}
    with pytest.raises(RecipeError, match="separator"):
        from_dict(base, check_files=False)
    base["data"]["train"][0]["format"] = "text"
    assert from_dict(base, check_files=False).data.train[0].separator == "<|endoftext|>"


def test_datasets_folders(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"text": "a"}, {"text": "b"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")) == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "dict"), max_rows=1) == rows[:1]
    with pytest.raises(DataError, match="no split 'test'"):
        load_rows(str(tmp_path / "dict"), split="test")
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", rows)
    assert load_rows(str(tmp_path / "files")) == rows


def test_hub_ids_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "owner/missing":
            raise FileNotFoundError("no such dataset")
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 5)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_rows("openai/gsm8k:main", split="test", max_rows=2)) == 2
    assert calls == [("openai/gsm8k", "main", "test")]
    with pytest.raises(DataError, match="owner/missing: cannot load dataset from the hub.*no such dataset"):
        load_rows("owner/missing")


# ---------------------------------------------------------------- collate, batch order, find_token

EXAMPLES = [Example([1, 2], [3, 4, 5]), Example([], [6, 7]), Example([8], [9])]


def test_collate_right_padding():
    batch = collate(EXAMPLES, PAD)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["position_ids"].dtype == torch.long
    assert batch["answer_mask"].dtype == torch.bool
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, PAD, PAD, PAD]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["answer_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert batch["answer_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]


def test_collate_left_padding_and_multiple():
    batch = collate(EXAMPLES, PAD, padding_side="left", pad_to_multiple_of=1)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"][2].tolist() == [PAD, PAD, PAD, 8, 9]
    assert batch["attention_mask"][2].tolist() == [0, 0, 0, 1, 1]
    assert batch["answer_mask"][2].tolist() == [0, 0, 0, 0, 1]
    assert batch["position_ids"][2].tolist() == [0, 0, 0, 0, 1]
    assert collate(EXAMPLES, PAD, pad_to_multiple_of=4)["input_ids"].shape == (3, 8)
    with pytest.raises(ValueError, match="'middle'"):
        collate(EXAMPLES, PAD, padding_side="middle")


def test_collate_shift_drops_first_real_token():
    for side in ("right", "left"):
        plain = collate(EXAMPLES, PAD, padding_side=side)["answer_mask"]
        shifted = collate(EXAMPLES, PAD, padding_side=side, shift=True)["answer_mask"]
        assert torch.equal(plain[0], shifted[0]) and torch.equal(plain[2], shifted[2])  # prompts absorb the shift
        assert plain[1].sum() == 2 and shifted[1].sum() == 1
        first = 0 if side == "right" else 6
        assert plain[1, first] and not shifted[1, first]


def test_batch_indices():
    a = batch_indices(10, 3, seed=1, epoch=0)
    assert a == batch_indices(10, 3, seed=1, epoch=0)
    assert [len(x) for x in a] == [3, 3, 3, 1]
    assert sorted(i for x in a for i in x) == list(range(10))
    assert a != batch_indices(10, 3, seed=1, epoch=1)
    assert a != batch_indices(10, 3, seed=2, epoch=0)
    assert [len(x) for x in batch_indices(10, 3, seed=1, epoch=0, drop_last=True)] == [3, 3, 3]
    assert batch_indices(0, 3, seed=1, epoch=0) == []


def test_find_token(tok):
    mask = 262
    examples = [Example([1], [2], "d.jsonl:1"), Example([3, mask], [4], "d.jsonl:5"), Example([5], [mask], "d.jsonl:6")]
    assert find_token(examples, mask) == "d.jsonl:5"
    assert find_token(examples[2:], mask) == "d.jsonl:6"
    assert find_token(examples, 999) is None
    with_mask = build_byte_tokenizer(reserved=0)
    with_mask.add_tokens(["<|mask|>"], special_tokens=True)
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "x<|mask|>", "output": "y"}]
    examples, _ = encode(rows, with_mask, source_name="m.jsonl")
    assert find_token(examples, with_mask.convert_tokens_to_ids("<|mask|>")) == "m.jsonl:2"
