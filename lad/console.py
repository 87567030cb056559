"""The command-line layer every LAD tool shares: one parser class, one way to fail, one way to quiet libraries.

A user error ends in one line, `PROG: error: ...`, exit status 2, naming the flag as the user typed it; an unknown
flag gets a did-you-mean; `--num-fewshot` and `--num_fewshot` are the same flag (LAD mixes lm-eval's underscores
with its own dashes, so every tool accepts both spellings); Ctrl-C ends in one line and exit status 130.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys


def closest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = closest(word, choices)
    return f" (did you mean {close}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse with LAD's error line, both spellings of every long flag, and suggestions for unknown flags."""

    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see {self.prog} --help)\n")

    def _flags(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def _suggestion(self, message: str) -> str:
        if message.startswith("the following arguments are required: "):  # argparse says so before the typo
            typos = [a.split("=")[0] for a in getattr(self, "_given", []) if a.startswith("--")
                     and a.split("=")[0] not in self._flags()]
            close = [(typo, closest(typo, self._flags())) for typo in typos]
            return "".join(f" ({typo}: did you mean {flag}?)" for typo, flag in close if flag)
        if not message.startswith("unrecognized arguments: "):
            return ""
        first = message.split(": ", 1)[1].split()[0].split("=")[0]
        return did_you_mean(first, self._flags()) if first.startswith("-") else ""

    def _spelled(self, args: list[str]) -> list[str]:
        """`--num-fewshot` for `--num_fewshot` (and back) when only the other spelling is a flag of this tool."""
        known = set(self._flags())
        out = []
        for arg in args:
            flag, eq, value = arg.partition("=")
            if arg.startswith("--") and flag not in known:
                for other in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                    if other in known:
                        arg = other + eq + value
                        break
            out.append(arg)
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = self._given = self._spelled(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)

    def parse_known_intermixed_args(self, args=None, namespace=None):
        args = self._given = self._spelled(list(sys.argv[1:] if args is None else args))
        return super().parse_known_intermixed_args(args, namespace)


def fail(prog: str, message) -> int:
    """Print a user error as LAD's one line; returns the exit status 2."""
    print(f"{prog}: error: {str(message).splitlines()[0] if str(message) else type(message).__name__}",
          file=sys.stderr)
    return 2


def printable(text: str) -> str:
    """Model output made safe to print: line breaks and tabs kept, every other control character (a raw byte
    from a byte-level model could move the cursor or clear the screen) shown as its visible stand-in."""
    from .sampling.render import visible

    return "\n".join("\t".join(visible(cell) for cell in line.split("\t")) for line in text.split("\n"))


def guarded(prog: str, work, *, on_interrupt: str = "") -> int:
    """Run a command's work: a user error (any ValueError, a model not found, an architecture LAD cannot make
    bidirectional, an OS error such as a full disk) becomes one line and exit status 2; Ctrl-C one line and 130."""
    from .modeling.bidirectional import UnsupportedArchitectureError
    from .modeling.locate import ModelNotFoundError

    try:
        return work()
    except (ValueError, ModelNotFoundError, UnsupportedArchitectureError, OSError) as err:
        return fail(prog, str(err).replace("\n", " ") if isinstance(err, OSError) else err)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted{'; ' + on_interrupt if on_interrupt else ''}", file=sys.stderr)
        return 130


def device_problem(device: str | None, flag: str = "--device") -> str | None:
    """Why `device` cannot run the model here (None when it can): checked before anything loads."""
    if device is None:
        return None
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        return f"{flag} {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"{flag} {device}: no CUDA GPU is available to PyTorch here"
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"{flag} {device}: MPS is not available to PyTorch here"
    return None


def quiet_libraries() -> None:
    """transformers', PEFT's, datasets' and bitsandbytes' warnings and bars (loading weights, writing a shard,
    building a split) are noise for a LAD command's user; LAD's own lines and bar say what happens."""
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.disable_progress_bar()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes: GPU-support notes when nothing asked for 4-bit; kernels (transformers' hub-kernel loader, which
    # bitsandbytes asks for a CPU kernel at import): offline-mode and trust-check notes
    for name in ("peft", "bitsandbytes", "datasets", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_git_hash() -> None:
    """lm-eval records the working folder's git commit by running `git describe`, whose "fatal: not a git
    repository" lands on the terminal whenever lad-eval runs outside a checkout: the same hash, git's stderr
    silenced (no repository: none recorded)."""
    import subprocess

    import lm_eval.evaluator

    def git_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL,
                                           text=True).strip()
        except (subprocess.CalledProcessError, OSError):
            return None

    lm_eval.evaluator.get_git_commit_hash = git_hash


def _quiet_request_bars() -> None:
    """lm-eval draws an unnamed bar per task while it builds the requests (57 of them for MMLU), each done in a
    blink; LadLM's own bar shows the work that takes time. Only lm-eval's task module loses its bars."""
    import functools

    import lm_eval.api.task
    from tqdm import tqdm

    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)


def quiet_lm_eval() -> None:
    """lm-eval's own noise in a lad-eval run: git's error outside a checkout and its blink-long bars."""
    _quiet_git_hash()
    _quiet_request_bars()


class BarSafeHandler(logging.StreamHandler):
    """A log line printed above a live tqdm bar, not glued onto its end (tqdm.write clears the bar, prints the
    line and draws the bar again below it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 — logging's own contract: report, never raise
            self.handleError(record)


def log_to_terminal(fmt: str, datefmt: str | None = None) -> None:
    """INFO lines on stderr, safe beside a progress bar; HTTP and lock libraries only when they warn."""
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt=datefmt, handlers=[BarSafeHandler(sys.stderr)])
    for noisy in ("httpx", "httpx2", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("huggingface_hub").propagate = False  # it prints through its own handler: not twice
