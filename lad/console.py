"""The command-line layer every LAD tool shares: one parser class, one way to fail, one way to quiet libraries.

A user error ends in one line, `PROG: error: ...`, exit status 2, naming the flag as the user typed it; an unknown
flag gets a did-you-mean; `--num-fewshot` and `--num_fewshot` are the same flag (LAD mixes lm-eval's underscores
with its own dashes, so every tool accepts both spellings); Ctrl-C ends in one line and exit status 130.
"""

from __future__ import annotations

import argparse
import difflib
import sys


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse with LAD's error line, both spellings of every long flag, and suggestions for unknown flags."""

    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see {self.prog} --help)\n")

    def _flags(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def _suggestion(self, message: str) -> str:
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
        args = self._spelled(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)

    def parse_known_intermixed_args(self, args=None, namespace=None):
        args = self._spelled(list(sys.argv[1:] if args is None else args))
        return super().parse_known_intermixed_args(args, namespace)


def fail(prog: str, message) -> int:
    """Print a user error as LAD's one line; returns the exit status 2."""
    print(f"{prog}: error: {str(message).splitlines()[0] if str(message) else type(message).__name__}",
          file=sys.stderr)
    return 2


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


def quiet_libraries() -> None:
    """transformers' and PEFT's warnings and weight-loading bars are noise for a LAD command's user."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
