"""The shared command-line layer (lad/console.py, lad/cli.py): one error line, exit 2, both flag spellings,
did-you-mean for unknown flags and commands, `lad --version`."""

from __future__ import annotations

import pytest

from lad.cli import main as lad
from lad.console import Parser, printable


def parser() -> Parser:
    p = Parser(prog="lad-x")
    p.add_argument("--num_fewshot", type=int)
    p.add_argument("--max-new-tokens", type=int)
    return p


def test_both_spellings_of_a_flag_are_the_same_flag():
    args = parser().parse_args(["--num-fewshot", "3", "--max_new_tokens=7"])
    assert (args.num_fewshot, args.max_new_tokens) == (3, 7)


def test_an_unknown_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--num-fewshots", "3"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert err.startswith("lad-x: error: unrecognized arguments: --num-fewshots 3 (did you mean --num_fewshot?)")


def test_a_mistyped_required_flag_is_suggested_too(capsys):
    """argparse reports the missing --model before the unknown --modle: the line names both."""
    from lad.generate_cli import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--modle", "runs/x", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err == ("lad-generate: error: the following arguments are required: --model "
                                            "(--modle: did you mean --model?) (see lad-generate --help)\n")


def test_every_lad_tool_uses_the_shared_parser():
    from lad import evaluation, export, finetune, generate_cli as generate
    from lad.demo import cli as demo
    from lad.distill import cli as distill

    for module in (demo, distill, evaluation, export, finetune, generate):
        assert getattr(module, "Parser") is Parser
        assert not hasattr(module, "_Parser")


def test_lad_version_and_unknown_commands(capsys):
    from lad import __version__

    assert lad(["--version"]) == 0 and capsys.readouterr().out == f"lad {__version__}\n"
    assert lad(["finetun"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'finetun' (did you mean finetune?)" in err
    assert lad(["frobnicate"]) == 2 and "unknown command 'frobnicate';" in capsys.readouterr().err
    assert lad([]) == 0 and "commands:" in capsys.readouterr().out


def test_printable_keeps_lines_and_tabs_and_shows_every_other_control_character():
    assert printable("a\x1b[2Jb\tc\nd\x07\r\x7f\x85") == "a\u241b[2Jb\tc\nd\u2407\u240d\u2421\ufffd"
    assert printable("Paris.\n") == "Paris.\n"
