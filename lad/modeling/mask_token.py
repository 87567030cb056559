"""Choose the mask token: reuse a spare special token when the tokenizer has one, else add `<|mask|>`.

Reusing a plain word (as LAD's original code does) collides with real text. LLaMA 3.x has no spare
embedding rows but ships `<|reserved_special_token_N|>`; SmolLM2 has rarely used specials. A reserved token
already has an embedding row (untrained, but LoRA learns to read it); an added token needs the embeddings
resized and that one row trained (PEFT `trainable_token_indices`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NEW_MASK_TOKEN = "<|mask|>"
RESERVED_PATTERN = re.compile(r"reserved_special_token_(\d+)|reserved_(\d+)|<\|reserved\|?>")
# Special tokens that chat models ship but never emit in chat; tried in this order after reserved ones.
KNOWN_SPARE = ("<empty_output>", "<issue_closed>", "<jupyter_script>", "<gh_stars>", "<reponame>")


class MaskTokenError(ValueError):
    """The mask token cannot be used (it is a role token, it occurs in the data, ...)."""


@dataclass(frozen=True)
class MaskToken:
    token: str
    id: int
    added: bool  # True: new row in the embeddings that must be trained


def _role_tokens(tokenizer) -> set[str]:
    roles = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
    return {t for t in roles if t}


def _single_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    encoded = tokenizer(token, add_special_tokens=False).input_ids
    return ids[0] if encoded == [ids[0]] else None


def spare_special_tokens(tokenizer) -> list[str]:
    """Special tokens that no chat turn or role uses: reserved ones (lowest number first), then known spares."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    roles = _role_tokens(tokenizer)
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]

    def usable(tok: str) -> bool:
        return tok not in roles and tok not in template and _single_id(tokenizer, tok) is not None

    reserved = []
    for tok in added:
        match = RESERVED_PATTERN.search(tok)
        if match and usable(tok):
            number = next((int(g) for g in match.groups() if g is not None), 0)
            reserved.append((number, tok))
    spares = [tok for _, tok in sorted(reserved)]
    spares += [tok for tok in KNOWN_SPARE if tok in added and usable(tok)]
    return spares


def resolve_mask_token(tokenizer, spec: str = "auto") -> MaskToken:
    """Pick (or add to `tokenizer`) the mask token. The caller resizes embeddings when `added` is True."""
    if spec == "auto":
        spares = spare_special_tokens(tokenizer)
        if spares:
            return MaskToken(spares[0], _single_id(tokenizer, spares[0]), added=False)
        spec = NEW_MASK_TOKEN
    if spec in _role_tokens(tokenizer):
        raise MaskTokenError(f"mask_token {spec!r} is the tokenizer's bos/eos/pad/unk token; choose a spare token")
    existing = _single_id(tokenizer, spec)
    if existing is not None:
        return MaskToken(spec, existing, added=False)
    tokenizer.add_tokens([spec], special_tokens=True)
    new_id = _single_id(tokenizer, spec)
    if new_id is None:  # pragma: no cover - tokenizers always encode an added special token alone
        raise MaskTokenError(f"mask_token {spec!r} could not be added to the tokenizer")
    return MaskToken(spec, new_id, added=True)


def check_not_in_data(mask: MaskToken, where: str | None) -> None:
    """`where` is the first example containing the mask id (from data.find_token), or None."""
    if where is not None:
        raise MaskTokenError(
            f"mask_token {mask.token!r} (id {mask.id}) occurs in the data at {where}: the model could not tell "
            "real text from noise; pick another mask_token or clean the data")
