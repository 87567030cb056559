"""Choosing the mask token: spare reserved specials first, else a new `<|mask|>`; role tokens refused."""

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.mask_token import (
    NEW_MASK_TOKEN,
    MaskToken,
    MaskTokenError,
    check_not_in_data,
    resolve_mask_token,
    spare_special_tokens,
)

# SmolLM2's added special tokens, ids 0..16 in its vocabulary
SMOL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smol_like_tokenizer(template: str = SMOL_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with SmolLM2's special tokens, roles and chat template."""
    words = ["hello", "world", "the", "capital", "paris"]
    vocab = {tok: i for i, tok in enumerate(SMOL_SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SMOL_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = template
    return tokenizer


def test_auto_picks_the_first_reserved_token_of_the_byte_tokenizer(byte_tokenizer):
    n = len(byte_tokenizer)
    mask = resolve_mask_token(byte_tokenizer)
    assert mask == MaskToken("<|reserved_special_token_0|>", 262, added=False)
    assert len(byte_tokenizer) == n
    assert byte_tokenizer("a<|reserved_special_token_0|>b", add_special_tokens=False).input_ids == [97, 262, 98]
    assert resolve_mask_token(byte_tokenizer, "auto") == mask  # stable


def test_reserved_tokens_are_ordered_by_number_not_by_text():
    tok = build_byte_tokenizer(reserved=12)
    assert spare_special_tokens(tok) == [f"<|reserved_special_token_{i}|>" for i in range(12)]


def test_reserved_token_used_by_the_template_is_skipped():
    tok = build_byte_tokenizer()
    tok.chat_template = tok.chat_template + "{{ '<|reserved_special_token_0|>' }}"
    assert resolve_mask_token(tok) == MaskToken("<|reserved_special_token_1|>", 263, added=False)


def test_without_spares_auto_adds_a_new_mask_token():
    tok = build_byte_tokenizer(reserved=0)
    old_len = len(tok)
    assert old_len == 262
    assert spare_special_tokens(tok) == []
    mask = resolve_mask_token(tok)
    assert mask == MaskToken(NEW_MASK_TOKEN, old_len, added=True)
    assert mask.token == "<|mask|>"
    assert len(tok) == old_len + 1
    assert tok.convert_tokens_to_ids("<|mask|>") == old_len
    assert tok("ab<|mask|>c", add_special_tokens=False).input_ids == [97, 98, old_len, 99]
    assert tok.decode([97, old_len, 98], skip_special_tokens=True) == "ab"
    # resolving again finds the token now present and does not grow the tokenizer a second time
    again = resolve_mask_token(tok)
    assert (again.token, again.id) == (NEW_MASK_TOKEN, old_len)
    assert len(tok) == old_len + 1


def test_a_named_existing_token_is_used(byte_tokenizer):
    n = len(byte_tokenizer)
    assert resolve_mask_token(byte_tokenizer, "<|reserved_special_token_3|>") == \
        MaskToken("<|reserved_special_token_3|>", 265, added=False)
    assert len(byte_tokenizer) == n


def test_a_named_new_token_is_added(byte_tokenizer):
    n = len(byte_tokenizer)
    mask = resolve_mask_token(byte_tokenizer, "<|noise|>")
    assert mask == MaskToken("<|noise|>", n, added=True)
    assert len(byte_tokenizer) == n + 1
    assert byte_tokenizer("x<|noise|>", add_special_tokens=False).input_ids == [120, n]


@pytest.mark.parametrize("name", ["<|eos|>", "<|pad|>", "<|bos|>"])
def test_naming_a_role_token_raises(byte_tokenizer, name):
    n = len(byte_tokenizer)
    with pytest.raises(MaskTokenError, match=r"mask_token '<\|(eos|pad|bos)\|>' is the tokenizer's bos/eos/pad/unk"):
        resolve_mask_token(byte_tokenizer, name)
    assert len(byte_tokenizer) == n
    assert issubclass(MaskTokenError, ValueError)


def test_naming_smol_eos_or_unk_raises():
    tok = smol_like_tokenizer()
    for name in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        with pytest.raises(MaskTokenError, match="bos/eos/pad/unk"):
            resolve_mask_token(tok, name)


def test_check_not_in_data():
    mask = MaskToken("<|reserved_special_token_0|>", 262, added=False)
    check_not_in_data(mask, None)  # clean data: no error
    with pytest.raises(MaskTokenError) as info:
        check_not_in_data(mask, "train.jsonl line 17")
    message = str(info.value)
    assert "train.jsonl line 17" in message
    assert "'<|reserved_special_token_0|>'" in message and "id 262" in message


def test_smollm2_like_tokenizer_picks_a_spare_never_a_role_or_template_token():
    tok = smol_like_tokenizer()
    n = len(tok)
    assert tok("hello <|im_start|> world", add_special_tokens=False).input_ids == [17, 1, 18]  # sanity
    spares = spare_special_tokens(tok)
    assert spares == ["<empty_output>", "<issue_closed>", "<jupyter_script>", "<gh_stars>", "<reponame>"]
    mask = resolve_mask_token(tok)
    assert mask == MaskToken("<empty_output>", 16, added=False)
    assert len(tok) == n
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                       add_generation_prompt=True)
    for token in spares:
        assert token not in SMOL_TEMPLATE and token not in rendered
        assert token not in {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}


def test_smollm2_like_template_using_a_spare_skips_it():
    template = SMOL_TEMPLATE.replace("message['content']",
                                     "(message['content'] if message['content'] else '<empty_output>')")
    tok = smol_like_tokenizer(template)
    assert spare_special_tokens(tok)[0] == "<issue_closed>"
    assert resolve_mask_token(tok) == MaskToken("<issue_closed>", 10, added=False)
