"""lad/scoring/options.py: the scoring options of `lad-eval`, lm-eval's `--model_args` and `LadLM(...)` declared
once, so the three take the same defaults and refuse the same values with the same words (issue 28)."""

from __future__ import annotations

import re

import pytest
from conftest import make_tiny_model, with_lora

from lad.evaluation import parse_args
from lad.modeling.byte_tokenizer import build_byte_tokenizer
from lad.modeling.denoiser import Denoiser
from lad.options import flag
from lad.scoring.harness import LadLM
from lad.scoring.options import SCORE_OPTIONS

MASK_ID = 3  # any byte id: these tests score nothing


@pytest.fixture(scope="module")
def lm_args():
    den = Denoiser(with_lora(make_tiny_model("llama")), MASK_ID, shift=True).eval()
    return {"denoiser": den, "tokenizer": build_byte_tokenizer()}


def eval_flags(*flags):
    return parse_args(["--model", "x", "--tasks", "arc_easy", *flags])


def test_the_cli_and_the_harness_default_every_option_alike(lm_args):
    args, lm = eval_flags(), LadLM(**lm_args)
    for name, spec in SCORE_OPTIONS.items():
        assert getattr(args, name) == spec.default == lm.settings[name], name


@pytest.mark.parametrize("flags, model_args, expected", [
    (["--iters", "8", "--order", "confidence"], "iters=8,order=confidence", {"iters": 8, "order": "confidence"}),
    (["--no-prefix-cache", "--mc-samples", "4", "--score", "elbo"], "prefix_cache=false,mc_samples=4,score=elbo",
     {"prefix_cache": False, "mc_samples": 4, "score": "elbo"}),
    (["--lookahead", "3", "--baseline", "none"], "lookahead=3,baseline=none,iters=exact",
     {"lookahead": 3, "baseline": "none", "iters": None}),
    (["--prefix-cache", "--strategy", "threshold", "--seed", "7"], "prefix_cache=True,strategy=threshold,seed=7",
     {"prefix_cache": True, "strategy": "threshold", "seed": 7}),
])
def test_flags_model_args_and_keywords_reach_the_same_settings(lm_args, flags, model_args, expected):
    from lm_eval.utils import simple_parse_args_string

    args = eval_flags(*flags)
    from_strings = LadLM(**lm_args, **simple_parse_args_string(model_args))  # as create_from_arg_string passes
    from_python = LadLM(**lm_args, **expected)
    for name, value in expected.items():
        assert getattr(args, name) == from_strings.settings[name] == from_python.settings[name] == value, name
    assert from_strings.settings == from_python.settings


@pytest.mark.parametrize("name, typed, value, why", [
    ("iters", "0", 0, "must be >= 1, got 0"),
    ("mc_samples", "0", 0, "must be >= 1, got 0"),
    ("seed", "-1", -1, "must be in [0, 2**32 - 1] (numpy's seed range), got -1"),
    ("order", "random", "random", "must be one of confidence, l2r, got 'random'"),
    ("lookahead", "0", 0, "must be >= 1, got 0"),
])
def test_a_bad_value_is_refused_in_the_same_words(lm_args, capsys, name, typed, value, why):
    with pytest.raises(SystemExit) as exit_info:
        eval_flags(flag(name), typed)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if SCORE_OPTIONS[name].choices is None:  # argparse words its own choices error
        assert len(err) == 1 and f"lad-eval: error: {flag(name)} {why} (see" in err[0], err
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} {why}")):
        LadLM(**lm_args, **{name: typed})  # a model_args string
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} {why}")):
        LadLM(**lm_args, **{name: value})


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.5])
def test_a_count_that_is_not_a_whole_number_is_refused_not_crashed_on(lm_args, value):
    with pytest.raises(ValueError, match=rf"^iters must be a whole number, got {value!r}$"):
        LadLM(**lm_args, iters=value)


def test_pairs_that_do_not_go_together_are_refused_alike(lm_args, capsys):
    with pytest.raises(SystemExit):
        eval_flags("--lookahead", "2", "--order", "confidence")
    assert "--lookahead 2 needs --score denoise --order l2r (got --score denoise --order confidence)" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^lookahead 2 needs score denoise order l2r"):
        LadLM(**lm_args, lookahead="2", order="confidence")


def test_a_misspelled_option_is_an_error_everywhere(lm_args, tmp_path):
    with pytest.raises(ValueError, match=r"unknown scoring option 'itres' \(did you mean 'iters'\?\)"):
        LadLM(**lm_args, itres=4)
    with pytest.raises(ValueError, match=r"--model_args: lad takes no 'mc_sample' \(did you mean 'mc_samples'\?\)"):
        LadLM.create_from_arg_string(f"pretrained={tmp_path},mc_sample=4")
    with pytest.raises(ValueError, match=r"^mc_samples must be a whole number, got 'many'$"):
        LadLM(**lm_args, mc_samples="many")


def test_help_comes_from_the_table(capsys):
    with pytest.raises(SystemExit):
        eval_flags("--help")
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in SCORE_OPTIONS.items():
        assert flag(name) in text and " ".join(spec.help.split())[:40] in text, name
