"""The output JSONL: row keys from prompt + settings, resumable appends, an atomic final rewrite."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path



from .prompts import DistillError, Prompt

log = logging.getLogger("lad.distill")


# ---------------------------------------------------------------- settings and row keys


def _digest(value, n: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:n]


def generation_settings(model: str, *, max_new_tokens: int, sample: bool, temperature: float, top_p: float,
                        top_k: int, seed: int, system_prompt: str | None, chat_template) -> dict:
    """Everything that decides a prompt's answer; stored in every row, compared on resume."""
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed} if sample else "greedy"
    return {"model": model, "max_new_tokens": max_new_tokens, "sampling": sampling,
            "system_prompt": system_prompt, "chat_template": chat_template}


def row_key(prompt: Prompt, settings: dict) -> str:
    return _digest([prompt.instruction, prompt.input, settings], 16)


def row_seed(seed: int, key: str) -> int:
    """A prompt's own sampling seed: its answer is the same in any batch, in any order."""
    return int(_digest([seed, key], 15), 16)


def _differences(theirs: dict, ours: dict) -> str:
    keys = sorted(set(theirs) | set(ours))
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys if theirs.get(k) != ours.get(k))


# ---------------------------------------------------------------- the output file


class OutputFile:
    """The JSONL being written: validates what is already there, appends batches durably, finishes in order."""

    def __init__(self, path: str | os.PathLike, settings: dict):
        from ..safety import FILE, PathError, check_destination

        try:  # normalised; not a folder, not under a file, writable
            self.path = check_destination(path, kind=FILE, flag="--out")
        except PathError as err:
            raise DistillError(str(err)) from None
        self.settings = settings
        self.done: dict[str, str] = {}  # key -> JSON line
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete, _, tail = data.rpartition(b"\n") if not data.endswith(b"\n") else (data, b"", b"")
        lines = complete.splitlines()
        for number, raw in enumerate(lines, start=1):
            if raw.strip():
                self._accept(raw, number)
        if tail.strip():
            try:
                self._accept(tail, len(lines) + 1)
            except DistillError:
                if not self.done:  # nothing of ours before it: not a run of ours that was cut short
                    raise
                log.info("%s: dropping an incomplete last line (an interrupted write)", self.path)
                os.truncate(self.path, len(complete) + 1)

    def _accept(self, raw: bytes, number: int) -> None:
        other = DistillError(f"--out {self.path} already holds other content (line {number} is not a row written "
                             "by lad distill); choose another file")
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise other from None
        if not isinstance(row, dict) or row.get("source") != "distill" or "key" not in row or "settings" not in row:
            raise other
        if row["settings"] != self.settings:
            diff = _differences(row["settings"], self.settings)
            raise DistillError(f"--out {self.path} was distilled with other settings ({diff}); rerun with those "
                               "settings to resume, or choose another file")
        self.done[row["key"]] = json.dumps(row, ensure_ascii=False)

    def append(self, rows: list[dict]) -> None:
        """Write a batch of rows and make them durable before the next batch starts."""
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                lead = b"" if f.read(1) == b"\n" else b"\n"
            else:
                lead = b""
            f.write(lead + "".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.done.update((r["key"], line) for r, line in zip(rows, lines))

    def finish(self, keys: list[str]) -> int:
        """Rewrite the file atomically with the rows in prompt order (rows of prompts not asked for this time
        stay, after them); returns the number of rows."""
        wanted = set(keys)
        lines = [self.done[k] for k in keys] + [line for k, line in self.done.items() if k not in wanted]
        text = "".join(line + "\n" for line in lines)
        if self.path.exists() and self.path.read_text(encoding="utf-8") == text:
            return len(lines)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(lines)


