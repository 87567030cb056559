"""Read training rows (plain dicts) from local files, `datasets` folders or the Hugging Face hub.

Local files get small readers of our own so that a bad row is reported as `file:line: what is wrong`
instead of a deep pyarrow/datasets traceback. Rows come back as a `Rows` list, which remembers where it came
from and, for `.jsonl`, the line of each row, so later errors (a missing field, say) name the right line.
"""

from __future__ import annotations

import json
import os
import re

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
# owner/name with an optional :config, e.g. "openai/gsm8k:main"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


class DataError(ValueError):
    """Any problem with the training data; the message names the source, row and field."""


class Rows(list):
    """A list of row dicts that remembers its source name and (when known) each row's 1-based line number."""

    def __init__(self, rows=(), source: str = "", lines: list[int] | None = None):
        super().__init__(rows)
        self.source = source
        self.lines = lines

    def where(self, index: int) -> str:
        """`source:line` for the row at 0-based `index` (the 1-based row number when lines are unknown)."""
        number = self.lines[index] if self.lines is not None and index < len(self.lines) else index + 1
        return f"{self.source}:{number}"


def load_rows(
    path: str, *, split: str = "train", text_field: str = "text", max_rows: int | None = None,
    separator: str | None = None,
) -> Rows:
    """Rows from a `.jsonl`/`.json`/`.parquet`/`.txt` file, a local `datasets` folder or a hub id.

    Hub ids are `owner/name` with an optional `:config` (e.g. "openai/gsm8k:main"). A `.txt` file is one row
    `{text_field: whole file}`. `separator` splits each row's text into documents (TinyStories' text files join
    stories with "<|endoftext|>"), so that packing puts EOS between them. `max_rows` keeps only the first rows
    (documents, with a separator), for quick runs.
    """
    path = os.fspath(path)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    if os.path.isdir(path):
        rows = _read_dataset_dir(path, split, max_rows)
    elif os.path.isfile(path):
        rows = _read_file(path, text_field, max_rows)
    elif _HUB_ID.match(path) and not path.endswith(SUFFIXES):
        rows = _read_hub(path, split, max_rows)
    else:
        raise DataError(f"{path}: file not found")
    if separator:
        rows = split_documents(rows, text_field, separator)
        rows = Rows(rows[:max_rows], source=rows.source, lines=rows.lines) if max_rows is not None else rows
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def split_documents(rows: Rows, field: str, separator: str) -> Rows:
    """One row per non-blank document of each row's `field` split on `separator` (other fields are dropped).

    A document's line is where it starts in its row's text (plus the row's own line), so errors still point into
    the file."""
    out, lines = [], []
    for index, row in enumerate(rows):
        text = row.get(field)
        if not isinstance(text, str):
            raise DataError(f"{rows.where(index)}: field {field!r} must be a string to split on a separator, "
                            f"got {type(text).__name__}")
        first = rows.lines[index] if rows.lines is not None and index < len(rows.lines) else 1
        offset = 0
        for piece in text.split(separator):
            if piece.strip():
                leading = len(piece) - len(piece.lstrip())
                out.append({field: piece.strip()})
                lines.append(first + text.count("\n", 0, offset + leading))
            offset += len(piece) + len(separator)
    return Rows(out, source=rows.source, lines=lines)


def _read_file(path: str, text_field: str, max_rows: int | None) -> Rows:
    """Dispatch on the file suffix."""
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return _read_jsonl(path, max_rows)
    if lower.endswith(".json"):
        rows = _read_json(path)
    elif lower.endswith(".parquet"):
        rows = _read_parquet(path)
    elif lower.endswith(".txt"):
        rows = Rows([{text_field: _read_text(path)}], source=path)
    else:
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)}, a folder or a hub id)")
    return Rows(rows[:max_rows], source=path) if max_rows is not None else rows


def text_lines(raw_lines, where: str, error: type[ValueError] = DataError):
    """(1-based number, text) of each line of bytes (a BOM on line 1 dropped); non-UTF-8 is `error` naming the line.
    Blank lines are yielded too, so numbers match an editor's (data files here, prompt files in lad distill)."""
    for number, raw in enumerate(raw_lines, start=1):
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def json_line(line: str, where: str, number: int, error: type[ValueError] = DataError):
    """The JSON value of one line of a JSONL file; malformed JSON is `error` naming the line and column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_jsonl(path: str, max_rows: int | None) -> Rows:
    """One JSON object per line; blank lines are skipped but still counted, so line numbers match an editor's."""
    rows, lines = [], []
    with open(path, "rb") as f:
        for number, line in text_lines(f, path):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if not line.strip():
                continue
            row = json_line(line, path, number)
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            lines.append(number)
    return Rows(rows, source=path, lines=lines)


def _read_json(path: str) -> Rows:
    """A JSON list of objects, or `{"data": [...]}`; errors name the 1-based item."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {type(data).__name__}')
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: item {i} is not a JSON object (got {type(row).__name__})")
    return Rows(data, source=path)


def _read_parquet(path: str) -> Rows:
    """All rows of a parquet file, as dicts."""
    import pyarrow.parquet as pq

    try:
        return Rows(pq.read_table(path).to_pylist(), source=path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read parquet file ({e})") from e


def _read_text(path: str) -> str:
    """The whole file as UTF-8 text."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_dataset_dir(path: str, split: str, max_rows: int | None) -> Rows:
    """A folder written by `save_to_disk`, or a folder of data files that `datasets` can read."""
    import datasets

    saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    try:
        ds = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, split=split)
    except Exception as e:
        raise DataError(f"{path}: cannot load dataset folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    return _to_rows(ds, path, max_rows)


def _read_hub(name: str, split: str, max_rows: int | None) -> Rows:
    """`datasets.load_dataset("owner/name", config, split=split)` for `owner/name[:config]`."""
    import datasets

    from ..hub import offline_reason

    repo, _, config = name.partition(":")
    reason = offline_reason()  # no hub: from the cache at once, not after a minute of retries
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except ConnectionError as e:
        if reason is None:
            raise DataError(f"{name}: cannot load dataset from the hub ({type(e).__name__}: {e})") from e
        raise DataError(f"{name}: not a local file or folder, not in the local data set cache "
                        f"({datasets.config.HF_DATASETS_CACHE}), and {reason}; check the path, or point the "
                        "recipe's data path at a local copy") from None
    except Exception as e:
        raise DataError(f"{name}: cannot load dataset from the hub ({type(e).__name__}: {e})") from e
    return _to_rows(ds, name, max_rows)


def _to_rows(ds, source: str, max_rows: int | None) -> Rows:
    """A `datasets.Dataset` (first `max_rows` rows) as a `Rows` list."""
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    return Rows(ds.to_list(), source=source)
