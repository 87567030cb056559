"""The Hugging Face hub, asked once and briefly.

huggingface_hub retries every file five times with backoff, so a machine that cannot reach the hub waited
~30-40 s and then printed a long traceback. LAD asks once, with a short timeout, before the first hub download;
when there is no answer it switches the process to the local cache (what HF_HUB_OFFLINE=1 does), so cached
models and data sets still load at once, and anything missing becomes one line that says where LAD looked.
"""

from __future__ import annotations

import functools
import os
import sys

PROBE_SECONDS = 3.0


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def reachable() -> bool:
    """One short request to the hub's endpoint; any answer, even an error status, means it is there."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint(), timeout=PROBE_SECONDS)
    except Exception:  # noqa: BLE001 — DNS, refused, timeout, proxy: all mean "not reachable from here"
        return False
    return True


def go_offline() -> None:
    """Read hub files from the local cache only, for the rest of this process (and its children)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")  # imported already: its copy of the flag too
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """None when the hub answers; otherwise why hub files can come only from the local cache. The process is
    then switched to the cache, so nothing waits on retries. Asked once per process."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if reachable():
        return None
    go_offline()
    return f"the Hugging Face hub ({endpoint()}) cannot be reached"


def local_suggestion(name: str) -> str:
    """' (did you mean runs/tiny?)' when `name` is a near miss of a file or folder beside it, else ''."""
    from .console import closest

    parent, leaf = os.path.split(name.rstrip("/"))
    folder = os.path.expanduser(parent or ".")
    close = closest(leaf, os.listdir(folder)) if leaf and os.path.isdir(folder) else None
    return f" (did you mean {os.path.join(parent, close)}?)" if close else ""


def check_hub_model(repo_id: str, what: str = "model", revision: str | None = None) -> None:
    """Before loading `repo_id` from the hub: nothing when the hub answers; from the cache when it does not;
    one line (ModelNotFoundError) when it is in neither, naming where LAD looked."""
    reason = offline_reason()
    if reason is None:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    filename = "config.json" if what == "model" else "tokenizer_config.json"
    if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return
    from .modeling.locate import ModelNotFoundError

    raise ModelNotFoundError(
        f"{what} not found: {repo_id}{local_suggestion(repo_id)}: no such local folder or .gguf file, not in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}), and {reason}; check the path, or download it once "
        "where the hub can be reached")
