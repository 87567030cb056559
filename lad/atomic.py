"""Atomic writes: a file or folder is either complete under its final name or not there at all.

Files are written to a temporary name, fsynced and renamed (`write_json`); folders are written to a `.tmp-NAME`
sibling, every file fsynced, then renamed (`staged`, `commit_folder`). A failed write removes its staging folder
and names the path (disk full, read-only, no permission), whatever library raised it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections import Counter
from contextlib import contextmanager
from pathlib import Path




def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, path)


def match_modes(folder: Path) -> None:
    """safetensors writes through a private temporary file, so its files come out owner-only (0600) beside
    files with the usual mode (0644 under the common umask): give them the mode most of the folder's other
    files have, so a folder that is shared or copied is readable as a whole."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    others = Counter(stat.S_IMODE(p.stat().st_mode) for p in files if p.suffix != ".safetensors")
    if not others:
        return
    mode = others.most_common(1)[0][0]
    for path in files:
        if path.suffix == ".safetensors" and stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)


def commit_folder(tmp: Path, final: Path) -> None:
    """fsync every file of `tmp` (safetensors files given the others' mode), then rename it to `final`
    (replacing an older `final`)."""
    match_modes(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def staging_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_failure(err: BaseException, where: Path) -> OSError | None:
    """An OSError naming `where` for a failed write (disk full, read-only, no permission), whatever library
    raised it (safetensors and torch.save wrap the OS error in their own); None for anything else."""
    if isinstance(err, OSError):
        return err if err.filename else OSError(err.errno, err.strerror or str(err), str(where))
    found = re.search(r"os error (\d+)|(No space left on device|Read-only file system|Permission denied)", str(err))
    if found is None:
        return None
    code = int(found.group(1)) if found.group(1) else {"No space left on device": 28, "Read-only file system": 30,
                                                        "Permission denied": 13}[found.group(2)]
    return OSError(code, os.strerror(code), str(where))


@contextmanager
def staged(final: Path):
    """Write a folder atomically: yields a staging folder, renamed to `final` when the block succeeds. On any
    failure the staging folder is removed (nothing half-written is left), and a failed write becomes an
    OSError naming `final`."""
    tmp = staging_dir(final)
    try:
        yield tmp
        commit_folder(tmp, final)
    except BaseException as err:  # Ctrl-C included: the staging folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(err, final) if isinstance(err, Exception) else None
        if failure is None or failure is err:
            raise
        raise failure from None
