"""A byte-level tokenizer with no merges, for tests and tiny from-scratch models.

Ids 0..255 are the byte values themselves, so any UTF-8 text round-trips exactly and expected ids in tests
can be written as `list(text.encode())`. Special tokens follow, in a fixed order. It is a normal
`PreTrainedTokenizerFast`: it has a chat template and saves/loads with `save_pretrained` /
`AutoTokenizer.from_pretrained`, so code under test takes the same paths it takes with a real model's tokenizer.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_MAX_LENGTH = 4096


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which is what the ByteLevel pre-tokenizer emits."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_tokenizer(reserved: int = 4) -> PreTrainedTokenizerFast:
    """Byte tokenizer: ids 0..255 are bytes, then bos, eos, pad, the role tokens and `reserved` spare tokens.

    `reserved=0` leaves no spare special token, for tests that must add a new one (e.g. `<|mask|>`).
    """
    if reserved < 0:
        raise ValueError(f"reserved must be >= 0, got {reserved}")
    vocab = {char: byte for byte, char in _byte_to_char().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    extra = [*ROLE_TOKENS, *(f"<|reserved_special_token_{i}|>" for i in range(reserved))]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD, *extra)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=extra,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
