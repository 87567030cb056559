"""One owner for a run's settings (issue 28): the Denoiser holds the run's `LadInfo`, and every tool reads its
default sampler, scoring order and prompt style from it; LAD's defaults are the measured ones (lad/defaults.py)."""

from __future__ import annotations

import pytest
from conftest import FAST, train_tiny

from lad import defaults
from lad.recipe import Recipe, load_recipe
from lad.run import load_run
from lad.sampling import default_strategy


@pytest.fixture(scope="module", params=["mask", "mixed"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"owner_{request.param}") / "run"
    return train_tiny(out, "max_steps=1", *FAST, f"noise.objective={request.param}"), request.param


def test_a_recipe_without_the_keys_gets_the_measured_defaults():
    recipe = Recipe()
    assert (recipe.attention, recipe.shift, recipe.noise.objective) == \
        (defaults.ATTENTION, defaults.SHIFT, defaults.OBJECTIVE) == ("prompt_causal", True, "mask")
    assert recipe.report.strategy is None and recipe.report.iters == defaults.ITERS
    tiny = load_recipe("recipes/tiny.yaml")  # CI's recipe states the bidirectional path it tests
    assert (tiny.attention, tiny.shift) == ("bidirectional", False)


def test_load_run_generate_demo_and_eval_pick_the_same_defaults(run):
    from lad.demo import DemoModel
    from lad.generate import _chat_template, load
    from lad.scoring.harness import LadLM

    folder, objective = run
    expected = defaults.strategy_for(objective)
    public, _, info = load_run(folder)
    via_generate, _ = load(folder)
    harness = LadLM(str(folder))
    assert public.info == info == via_generate.info == harness.info
    assert default_strategy(public) == default_strategy(via_generate) == info.strategy == expected
    assert harness.strategy == expected  # lad-eval's generative tasks
    assert _chat_template(public, {}) == _chat_template(via_generate, {}) == info.chat_template
    assert DemoModel(public, None, public.info.chat_template).chat_template == info.chat_template
    assert info.score_order == defaults.SCORE_ORDER == "l2r"


def test_the_lad_eval_and_generate_clis_default_to_the_runs_sampler():
    from lad.evaluation import parse_args as eval_args
    from lad.generate_cli import parse_args as generate_args

    assert eval_args(["--model", "x", "--tasks", "arc_easy"]).strategy is None  # resolved from the run
    assert eval_args(["--model", "x", "--tasks", "arc_easy"]).order == defaults.SCORE_ORDER
    assert generate_args(["--model", "x", "--prompt", "p"]).strategy is None


def test_prefix_cache_exactness_is_the_denoisers_answer():
    from conftest import make_tiny_model

    from lad.modeling.attention import MODES, prefix_cache_exact
    from lad.modeling.denoiser import Denoiser

    tiny_model = make_tiny_model()
    for mode in MODES:
        blocks = 4 if mode == "block_causal" else None
        assert Denoiser(tiny_model, 5, attention=mode, block_size=blocks).prefix_cache_exact is prefix_cache_exact(mode)
    assert [m for m in MODES if prefix_cache_exact(m)] == ["prompt_causal", "block_causal"]
    with pytest.raises(ValueError, match="block_size: attention block_causal needs an integer block_size"):
        Denoiser(tiny_model, 5, attention="block_causal")
    with pytest.raises(ValueError, match="attention must be one of bidirectional, prompt_causal"):
        Denoiser(tiny_model, 5, attention="block")


def test_sampler_options_are_declared_once_and_unknown_ones_are_errors(run):
    from lad.generate import GenerateError, generate
    from lad.sampling import split_options, strategy_options
    from lad.scoring.harness import LadLM

    folder, _ = run
    assert "block_length" in strategy_options("confidence") and "block_length" not in strategy_options("refine")
    assert split_options("refine", {"iters": 2, "block_length": 4}) == ({"iters": 2}, {"block_length": 4})
    with pytest.raises(ValueError, match="unknown sampling option 'iter' \\(did you mean 'iters'\\?\\)"):
        split_options("confidence", {"iter": 2})
    with pytest.raises(GenerateError, match="unknown sampling option 'max_new_token'"):
        generate(folder, "hi", max_new_token=4)
    with pytest.raises(GenerateError, match="strategy 'refine' does not take block_length"):
        generate(folder, "hi", strategy="refine", block_length=2, max_new_tokens=4, iters=2)
    with pytest.raises(TypeError):  # a strategy called directly refuses what it does not declare
        from lad.sampling import refine

        refine(None, None, ["hi"], block_length=2)
    with pytest.raises(ValueError, match="lad takes no 'iter' \\(did you mean 'iters'\\?\\)"):
        LadLM.create_from_arg_string(f"pretrained={folder},iter=3")


def test_the_cli_and_the_demo_take_their_options_from_the_strategies():
    from lad.demo import view
    from lad.generate_cli import NOT_FLAGS, OPTION_FLAGS, parse_args
    from lad.sampling import STRATEGIES, strategy_options

    declared = set().union(*(strategy_options(s) for s in STRATEGIES))
    assert set(OPTION_FLAGS) == declared - NOT_FLAGS  # every option a strategy declares is a flag
    args = parse_args(["--model", "x", "--prompt", "p"])
    for name, flag in OPTION_FLAGS.items():
        assert getattr(args, name) is None, flag  # not given: the strategy's own default
    for strategy in STRATEGIES:  # the page's settings are options some strategy declares
        page = view.sampler_options(strategy, 16, 64, 0.5, False, "none", "default", 0, 3, 0.9, 0,
                                    delay_eos=True, block_cache=True)
        assert set(page) <= declared
