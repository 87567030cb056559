"""Turn rows into token ids: a prompt (never corrupted, never supervised) and an answer (corrupted and supervised).

Formats:
- `instruction`: fields instruction / input / output (remappable). The user message is the instruction, plus
  "\\n\\n" + input when input is non-empty; the answer is the output.
- `chat`: a `messages` list of {"role", "content"}; the last message is the answer and must be the assistant's,
  every message before it is prompt.
- `text`: raw text packed into windows of exactly `max_length` tokens, every token an answer token.

Prompt rendering (`prompt_ids`): with a chat template, `apply_chat_template(..., add_generation_prompt=True)`.
Without one, plain text: bos (if the tokenizer has one), then each message's content followed by "\\n"; chat rows
prefix each turn with "role: " and end with the cue "assistant: ". Inference must render prompts the same way,
so it should call `prompt_ids` too.

The answer is `tokens(output) + [eos]`: the model learns to stop. For templates such as SmolLM2's the eos token is
the turn end (`<|im_end|>`), so the answer closes the assistant turn exactly as the template would.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sources import DataError, Rows

FORMATS = ("instruction", "chat", "text")
TRUNCATIONS = ("right", "left", "drop")
DEFAULT_FIELDS = {
    "instruction": {"instruction": "instruction", "input": "input", "output": "output"},
    "chat": {"messages": "messages"},
    "text": {"text": "text"},
}
_CHUNK = 1000  # rows per batched tokenizer call


@dataclass
class Example:
    """One training sequence: prompt ids then answer ids; `source` ("file.jsonl:12") is for error messages."""

    prompt_ids: list[int]
    answer_ids: list[int]
    source: str = ""


@dataclass
class EncodeStats:
    """What happened to the rows of one source, for the training log."""

    rows: int = 0
    kept: int = 0
    dropped_no_answer: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    source: str = ""
    packed: bool = False  # fmt="text": `kept` counts windows, not rows

    def summary(self) -> str:
        """One log line, e.g. "alpaca.jsonl: 999 rows, 990 kept, 9 dropped (no answer tokens left), 12 truncated"."""
        if self.packed:
            return f"{self.source or 'data'}: {self.rows} rows packed into {self.kept} windows"
        parts = [f"{self.rows} rows", f"{self.kept} kept", f"{self.dropped_no_answer} dropped (no answer tokens left)"]
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped (longer than max_length)")
        parts.append(f"{self.truncated} truncated")
        return f"{self.source or 'data'}: " + ", ".join(parts)


def encode_rows(
    rows,
    tokenizer,
    *,
    fmt: str,
    fields: dict[str, str] | None = None,
    max_length: int,
    truncation: str = "right",
    chat_template: str | bool = "auto",
    system_prompt: str | None = None,
    source_name: str = "",
) -> tuple[list[Example], EncodeStats]:
    """Encode rows of one source as Examples, fitting each into `max_length` tokens.

    Truncation, when prompt + answer is longer than `max_length`:
    - "right": cut the end of the answer (its eos may be lost); counted in `truncated`.
    - "left": drop tokens from the start of the prompt (the end of the prompt stays next to the answer), then
      from the end of the answer if still too long; counted in `truncated`.
    - "drop": drop the row; counted in `dropped_too_long`.
    A row whose answer is empty (empty output, or a prompt that fills `max_length`) is dropped and counted in
    `dropped_no_answer`: it would teach nothing. `fmt="text"` packs instead and never truncates.

    `chat_template`: "auto" uses the tokenizer's template if it has one, True requires it, False renders plain
    text, and any other string is used as the Jinja template itself.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r} (expected one of {', '.join(TRUNCATIONS)})")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; LAD needs one to end answers and separate documents")
    rows = rows if isinstance(rows, Rows) else Rows(rows, source=source_name or "data")
    name = source_name or rows.source or "data"
    fields = _fields(fmt, fields)
    stats = EncodeStats(rows=len(rows), source=name, packed=fmt == "text")
    if fmt == "text":
        examples = _pack_text(rows, tokenizer, fields["text"], max_length)
        stats.kept = len(examples)
        return examples, stats

    template = _resolve_template(tokenizer, chat_template)
    examples = []
    for start in range(0, len(rows), _CHUNK):
        chunk = range(start, min(start + _CHUNK, len(rows)))
        parsed = [_parse_row(rows[i], fmt, fields, system_prompt, rows.where(i)) for i in chunk]
        prompts = _render_prompts([p[0] for p in parsed], tokenizer, template, role_prefixes=fmt == "chat")
        answers = _tokenize([p[1] for p in parsed], tokenizer)
        for i, prompt, answer in zip(chunk, prompts, answers):
            example = _fit(prompt, answer, max_length, truncation, stats)
            if example is not None:
                example.source = rows.where(i)
                examples.append(example)
    stats.kept = len(examples)
    return examples, stats


def prompt_ids(
    messages: list[dict], tokenizer, *, chat_template: str | bool = "auto", role_prefixes: bool = False
) -> list[int]:
    """Token ids of a prompt, rendered the way training renders it (see the module docstring)."""
    template = _resolve_template(tokenizer, chat_template)
    return _render_prompts([messages], tokenizer, template, role_prefixes=role_prefixes)[0]


def find_token(examples: list[Example], token_id: int) -> str | None:
    """Source ("file:row") of the first example whose prompt or answer contains `token_id`, else None."""
    for example in examples:
        if token_id in example.prompt_ids or token_id in example.answer_ids:
            return example.source or "?"
    return None


def _fields(fmt: str, fields: dict[str, str] | None) -> dict[str, str]:
    """Default field names for `fmt`, overridden by the user's; unknown keys are an error (likely a typo)."""
    merged = dict(DEFAULT_FIELDS[fmt])
    unknown = set(fields or {}) - set(merged)
    if unknown:
        raise ValueError(f"unknown field key(s) {sorted(unknown)} for format {fmt!r} (expected {sorted(merged)})")
    merged.update(fields or {})
    return merged


def _resolve_template(tokenizer, chat_template: str | bool) -> tuple[bool, str | None]:
    """(use a template?, template to pass to apply_chat_template; None means the tokenizer's own)."""
    if chat_template == "auto":
        return bool(tokenizer.chat_template), None
    if chat_template is True:
        if not tokenizer.chat_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        return True, None
    if chat_template is False or chat_template is None:
        return False, None
    if isinstance(chat_template, str):
        return True, chat_template
    raise ValueError(f"chat_template must be 'auto', True, False or a template string, got {chat_template!r}")


def _string(row: dict, field: str, where: str, *, required: bool = True) -> str:
    """`row[field]` as a string; a missing optional field (or null) is ""."""
    if field not in row or row[field] is None:
        if required:
            problem = "missing field" if field not in row else "null field"
            raise DataError(f"{where}: {problem} {field!r} (row has {', '.join(map(repr, row)) or 'no fields'})")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def instruction_messages(instruction: str, input: str = "", system_prompt: str | None = None) -> list[dict]:
    """The prompt messages of an `instruction` row; shared with `lad.distill`, whose parent must answer the very
    prompt that training will render."""
    messages = [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]
    return _with_system(messages, system_prompt)


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _parse_row(row: dict, fmt: str, fields: dict, system_prompt: str | None, where: str) -> tuple[list[dict], str]:
    """(prompt messages, answer text) of one row."""
    if fmt == "instruction":
        user = _string(row, fields["instruction"], where)
        extra = _string(row, fields["input"], where, required=False)
        answer = _string(row, fields["output"], where)
        return instruction_messages(user, extra, system_prompt), answer
    messages, answer = _parse_chat(row, fields["messages"], where)
    return _with_system(messages, system_prompt), answer


def _parse_chat(row: dict, field: str, where: str) -> tuple[list[dict], str]:
    """Check a chat row's messages; all but the last are the prompt, the last (assistant) is the answer."""
    if field not in row:
        raise DataError(f"{where}: missing field {field!r} (row has {', '.join(map(repr, row)) or 'no fields'})")
    messages = row[field]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{where}: field {field!r} must be a list of at least 2 messages (prompt turns, then the answer)"
        )
    clean = []
    for n, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {field!r}, message {n} must be an object with string 'role' and 'content'")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        role = clean[-1]["role"]
        raise DataError(f"{where}: field {field!r}: the last message must be the assistant's answer, got role {role!r}")
    return clean[:-1], clean[-1]["content"]


def _render_prompts(
    conversations: list[list[dict]], tokenizer, template: tuple[bool, str | None], *, role_prefixes: bool
) -> list[list[int]]:
    """Prompt ids for each conversation: the chat template with a generation prompt, or plain text."""
    use_template, custom = template
    if use_template:
        # Batched call; transformers 5 returns a BatchEncoding whose input_ids is one list of ids per conversation.
        out = tokenizer.apply_chat_template(
            conversations,
            chat_template=custom,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            tokenizer_kwargs={"verbose": False},  # long prompts are truncated by us, no need to warn
        )
        return [list(ids) for ids in out["input_ids"]]
    texts = []
    for messages in conversations:
        if role_prefixes:
            texts.append("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")
        else:
            texts.append("".join(f"{m['content']}\n" for m in messages))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [bos + ids for ids in _tokenize(texts, tokenizer, eos=False)]


def _tokenize(texts: list[str], tokenizer, *, eos: bool = True) -> list[list[int]]:
    """Ids of each text without special tokens added (one batched call); with `eos`, non-empty ones get eos."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    tail = [tokenizer.eos_token_id] if eos else []
    return [list(ids) + tail if ids else [] for ids in out]


def _fit(prompt: list[int], answer: list[int], max_length: int, truncation: str, stats: EncodeStats):
    """Apply the truncation policy; None when the row is dropped (stats updated)."""
    if not answer:
        stats.dropped_no_answer += 1
        return None
    excess = len(prompt) + len(answer) - max_length
    if excess > 0:
        if truncation == "drop":
            stats.dropped_too_long += 1
            return None
        if truncation == "left":
            cut = min(excess, len(prompt))
            prompt, excess = prompt[cut:], excess - cut
        # a prompt longer than max_length leaves no room (a negative stop would keep a slice of the answer)
        answer = answer[: max(0, len(answer) - excess)]
        if not answer:
            stats.dropped_no_answer += 1
            return None
        stats.truncated += 1
    return Example(prompt_ids=prompt, answer_ids=answer)


def _pack_text(rows: Rows, tokenizer, field: str, max_length: int) -> list[Example]:
    """Join every row's tokens with eos between documents and cut into windows of `max_length`.

    The last partial window is kept if it has at least 2 tokens; it is not padded here. A window's source
    names the rows it spans ("file:3-5").
    """
    stream: list[int] = []
    owner: list[int] = []  # 0-based row index of each token (eos separators belong to the row before)
    for start in range(0, len(rows), _CHUNK):
        chunk = range(start, min(start + _CHUNK, len(rows)))
        texts = [_string(rows[i], field, rows.where(i)) for i in chunk]
        for i, ids in zip(chunk, _tokenize(texts, tokenizer, eos=False)):
            if not ids:
                continue
            if stream:
                stream.append(tokenizer.eos_token_id)
                owner.append(owner[-1])
            stream.extend(ids)
            owner.extend([i] * len(ids))
    examples = []
    for start in range(0, len(stream), max_length):
        window = stream[start : start + max_length]
        if len(window) < 2:
            break
        first, last = rows.where(owner[start]), rows.where(owner[start + len(window) - 1])
        source = first if first == last else f"{first}-{last.rsplit(':', 1)[1]}"
        examples.append(Example(prompt_ids=[], answer_ids=window, source=source))
    return examples
