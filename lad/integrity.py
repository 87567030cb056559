"""What is wrong with a run's files, as text (None when nothing is): lad.json's fields, JSON files, safetensors
headers, PyTorch archives. `lad.run` raises each as a `RunDirError` naming the file. Nothing here loads a model
or unpickles anything: the checks are cheap enough to run before a model loads or anything is written.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

from .modeling.attention import MODES
from .noise import OBJECTIVES

def _one_of(values: tuple[str, ...]) -> str:
    quoted = [f'"{v}"' for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


# lad.json's prompt_style → the samplers' chat_template argument (and what lad.json said before prompt_style):
# "chat" the tokenizer's chat template; "plain" the prompt as plain text, no template (the tokenizer has none, or
# the recipe said data.chat_template: false); "raw" the string tokenized as given (trained on plain text only: a
# prompt is continued, e.g. "Once upon a time")
PROMPT_STYLES = {"chat": True, "plain": False, "raw": "raw"}

# what each lad.json field must hold: (check, what the error says is expected)
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")
_MAPPING = (lambda v: isinstance(v, dict), "a JSON object")
LAD_FIELDS = {
    "base_model": _MAPPING, "mask_token": _STR, "mask_token_id": _INT, "mask_token_added": _BOOL, "vocab_size": _INT,
    "shift": _BOOL, "objective": (lambda v: v in OBJECTIVES, _one_of(OBJECTIVES)),
    "noise": _MAPPING, "adapter": (lambda v: v in ("lora", "full"), '"lora" or "full"'), "merged": _BOOL,
    "prompt_style": (lambda v: v in PROMPT_STYLES, _one_of(PROMPT_STYLES)), "max_length": _INT,
    "chat_template": (lambda v: isinstance(v, bool) or v == "raw", 'true, false or "raw"'),  # before prompt_style
    "eos_padding": _BOOL, "attention": (lambda v: v in MODES, _one_of(MODES)),
    "block_size": (lambda v: v is None or _INT[0](v) and v >= 1, "an integer >= 1 or null"),
    "lora_gate": (lambda v: v in ("none", "masked"), '"none" or "masked"'),
    "step": _INT, "lad_version": _STR, "format": _INT, "extra": _MAPPING,
}


def json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def lad_field_problem(name: str, value) -> str | None:
    """Why `value` cannot be lad.json's field `name`."""
    check, expected = LAD_FIELDS[name]
    if not check(value):
        return f"{name}: expected {expected}, got {shown(value)}"
    if name in ("vocab_size", "max_length", "format") and value < 1 or name == "step" and value < 0:
        return f"{name}: must be >= {int(name != 'step')}, got {value}"
    if name == "base_model" and not isinstance(value.get("name_or_path"), (str, type(None))):
        return f"base_model.name_or_path: expected a string or null, got {shown(value['name_or_path'])}"
    return None


def lad_json_problem(data: dict) -> str | None:
    """The first field of a lad.json object (every required field present) that LAD cannot use."""
    for name in LAD_FIELDS:
        problem = lad_field_problem(name, data[name]) if name in data else None
        if problem:
            return problem
    if data.get("attention") == "block_causal" and data.get("block_size") is None:
        return "block_size: attention block_causal needs its block_size (an integer >= 1)"
    if not 0 <= data["mask_token_id"] < data["vocab_size"]:
        return f"mask_token_id: must be in [0, vocab_size {data['vocab_size']}), got {data['mask_token_id']}"
    # `objective` repeats noise.objective so that format-1 readers (LAD before the noise dict) still load a run;
    # the two must agree, or the sampler a run picks would not be the schedule it trained on
    noise = data["noise"].get("objective") if isinstance(data.get("noise"), dict) else None
    if noise is not None and noise != data["objective"]:
        return f"objective: {data['objective']!r} disagrees with noise.objective {noise!r} (edited by hand?)"
    # `chat_template` repeats prompt_style (true / false / "raw") so that LAD before prompt_style renders a run's
    # prompts as it trained on them, instead of defaulting to the chat template; the two must agree
    style, legacy = data.get("prompt_style"), data.get("chat_template")
    if style in PROMPT_STYLES and legacy is not None and PROMPT_STYLES[style] != legacy:
        return f"prompt_style: {style!r} disagrees with chat_template {json.dumps(legacy)} (edited by hand?)"
    return None


def json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the file's JSON object, None), or (None, what is wrong with it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"unreadable, truncated or corrupt ({err})"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {json_kind(data)}"
    return data, None


def safetensors_problem(path: Path) -> str | None:
    """The header opens and the tensors it lists fit in the file (a same-size overwrite of the tensor bytes alone
    cannot be told from real weights: safetensors has no checksum)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as err:
        return f"not a readable safetensors file, truncated or corrupt ({err})"
    return None


def pt_problem(path: Path) -> str | None:
    """A `torch.save` file is a zip archive with a CRC per entry: check them all (reads the file, unpickles
    nothing)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error):
        bad = path.name
    return None if bad is None else "not a readable PyTorch file, truncated or corrupt"


def files_problem(folder: Path, names: tuple[str, ...] = ("config.json", "adapter_config.json",
                                                         "model.safetensors.index.json")) -> str | None:
    """`PATH: what is wrong` for the first safetensors file, or JSON file of `names`, of `folder` that does not
    open (a model, weights or tokenizer folder, read before anything loads from it)."""
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            return f"{path}: {problem}"
    for name in names:
        if (folder / name).is_file():
            problem = json_object(folder / name)[1]
            if problem:
                return f"{folder / name}: {problem}"
    return None


TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_files_problem(folder: Path) -> str | None:
    """`PATH: what is wrong` when the tokenizer saved in `folder` is missing a file or has a corrupt one."""
    if not (folder / "tokenizer_config.json").is_file():
        return f"{folder}: no tokenizer_config.json: the run's tokenizer files are missing"
    problem = files_problem(folder, TOKENIZER_JSON)
    if problem is None and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problem = f"{folder}: no tokenizer.json (nor tokenizer.model, vocab.json): the run's tokenizer files are " \
                  "incomplete"
    return problem


def checkpoint_files_problem(folder: Path) -> str | None:
    """A checkpoint whose files keep the sizes state.json records may still be overwritten: every safetensors
    header opens and every PyTorch file's CRCs hold, or `PATH: what is wrong` for the first that does not."""
    problem = files_problem(folder, ())
    for path in [] if problem else sorted(folder.glob("*.pt")):
        problem = pt_problem(path)
        if problem:
            return f"{path}: {problem}"
    return problem
