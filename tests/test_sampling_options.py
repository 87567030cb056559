"""lad/sampling/options.py: every sampling option declared once, and the CLI and the Python API checking it alike."""

import inspect
import math

import pytest

from lad.defaults import POLISH_KEEP
from lad.generate import GenerateError, generate
from lad.generate_cli import NOT_FLAGS, parse_args
from lad.sampling import STRATEGIES
from lad.sampling.options import OPTIONS, POLISH_OPTIONS, flag, option_problem


def declared_defaults():
    """(strategy, option, default) for every option a strategy declares."""
    for name, fn in STRATEGIES.items():
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in NOT_FLAGS:
                yield name, p.name, p.default


@pytest.mark.parametrize("strategy, name, default", list(declared_defaults()))
def test_each_strategy_default_is_an_entry_of_its_kind_and_valid(strategy, name, default):
    spec = OPTIONS[name]
    if default is not None:
        assert isinstance(default, spec.kind), (strategy, name)
    assert option_problem(name, default) is None, (strategy, name)


@pytest.mark.parametrize("name, value, line", [
    ("iters", 0, "--iters must be >= 1, got 0"),
    ("top_p", 0.0, "--top-p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "--top-p must be in (0, 1], got 1.5"),
    ("noise_start", 2.0, "--noise-start must be in [0, 1], got 2.0"),
    ("temperature", math.nan, "--temperature must be >= 0, got nan"),
    ("early_stop", -1, "--early-stop must be >= 0 (0 = off), got -1"),
    ("seed", 2**64, f"--seed must be a 64-bit integer, got {2**64}"),
    ("polish_keep", -0.5, "--polish-keep must be in [0, 1], got -0.5"),
    ("remask", "lowest", "--remask must be one of random, confidence, got 'lowest'"),
])
def test_out_of_range_values_are_named_as_typed(name, value, line):
    assert option_problem(name, value, flag(name)) == line


@pytest.mark.parametrize("name, value", [("top_p", 1.0), ("seed", -2**63), ("polish_keep", 0.0), ("threshold", 1.5),
                                         ("early_stop", 0), ("retention", "locked")])
def test_edge_values_are_valid(name, value):
    assert option_problem(name, value) is None


def test_cli_flags_take_type_and_help_from_the_table(capsys):
    args = parse_args(["--model", "x", "--prompt", "p", "--top-p", "0.5", "--no-carry", "--delay-eos"])
    assert args.top_p == 0.5 and args.carry is False and args.delay_eos is True
    assert args.polish == 0 and args.polish_keep == POLISH_KEEP
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*POLISH_OPTIONS, "draft_length", "noise_start"]:
        assert flag(name) in text and " ".join(OPTIONS[name].help.split())[:40] in text


def test_the_python_api_checks_the_same_ranges_before_loading(tmp_path):
    with pytest.raises(GenerateError, match=r"^iters must be >= 1, got 0$"):
        generate(tmp_path / "no-such-run", "hi", iters=0)  # refused before any loading
    with pytest.raises(GenerateError, match=r"^polish_keep must be in \[0, 1\], got 2$"):
        generate(tmp_path / "no-such-run", "hi", polish_keep=2)
