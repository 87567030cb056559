"""The byte tokenizer: exact round-trips, single-id special tokens, chat template, save/load."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lad.modeling.byte_tokenizer import build_byte_tokenizer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
RESERVED = [f"<|reserved_special_token_{i}|>" for i in range(4)]


_SHARED = build_byte_tokenizer()  # hypothesis tests cannot take function-scoped fixtures


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.mark.parametrize(
    "text", ["", "hello world", "  two  spaces ", "héllo 😀 中文字", "\x00\x01\t\r\n\x7f", "ﬁ\u200b\ufeff"]
)
def test_round_trip_and_ids_are_bytes(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(text):
    tok = _SHARED
    # a special token's literal text is that token (as in every HF tokenizer); hypothesis finds the literals
    assume(not any(special in text for special in SPECIALS + RESERVED))
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text



def test_special_tokens_are_single_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS + RESERVED]
    assert ids == list(range(256, 266))
    assert len(tok) == 266
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok("a<|eos|>b", add_special_tokens=False).input_ids == [97, 257, 98]
    assert tok.decode([97, 257, 98], skip_special_tokens=True) == "ab"
    assert tok.model_max_length == 4096


def test_reserved_zero_leaves_room_for_a_mask_token():
    tok = build_byte_tokenizer(reserved=0)
    assert len(tok) == 262
    assert tok.add_tokens(["<|mask|>"], special_tokens=True) == 1
    assert tok("x<|mask|>", add_special_tokens=False).input_ids == [120, 262]


def test_chat_template(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>S<|eos|><|user|>hi<|eos|><|assistant|>"
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"] == [259, 83, 257, 260, 104, 105, 257, 261]


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>héllo 😀<|eos|><|assistant|>\n"
    assert loaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert loaded.chat_template == tok.chat_template
    assert loaded.all_special_tokens == tok.all_special_tokens
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (256, 257, 258)
    assert loaded.model_max_length == 4096
