"""Noiseless refinement after a draft (`--polish N`, lad/sampling/polish.py) and the repair benchmark
(eval/bench_refine.py): an oracle denoiser repairs every kind of corruption, a draft the model is certain of is
never changed, and the passes are counted, traced and reported wherever a strategy's answer is."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from eval import bench_refine
from lad.generate import generate, load
from lad.noise import EDITS, apply_edit
from lad.sampling.common import build_canvas
from lad.sampling.polish import polish, polish_canvas

REPO = Path(__file__).resolve().parents[1]
MASK = 262  # the byte tokenizer's spare id the tiny runs use as mask


class Oracle(nn.Module):
    """Predicts `table[j]` at answer slot j whatever the canvas holds (a repair oracle when the table is the
    reference); counts its forwards."""

    prefix_cache_exact = False  # a bidirectional run's answers to the Denoiser's questions
    block_size = None

    def __init__(self, tokens: list[int], vocab: int, p: float = 0.99):
        super().__init__()
        self.mask_id, self.shift, self.calls = MASK, False, 0
        self.table = torch.full((len(tokens), vocab), math.log((1 - p) / (vocab - 1)))
        self.table[torch.arange(len(tokens)), torch.tensor(tokens)] = math.log(p)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, positions=None, **_):
        self.calls += 1
        return self.table.repeat(ids.shape[0], 1)


class WithParent(Oracle):
    """An oracle denoiser whose AR parent predicts `parent[j]` at slot j (another table); counts both."""

    info = None

    def __init__(self, tokens: list[int], parent: list[int], vocab: int, p: float = 0.99, parent_p: float = 0.99):
        super().__init__(tokens, vocab, p)
        self.parent, self.parent_calls = Oracle(parent, vocab, parent_p), 0

    def parent_read(self, canvas, first: int, end: int) -> torch.Tensor:
        return self.parent.table[first:end].log_softmax(-1).repeat(canvas.ids.shape[0], 1, 1)

    @contextmanager
    def parent_reader(self, canvas):
        def read(first, end):
            self.parent_calls += 1
            return self.parent_read(canvas, first, end)
        yield read


class BigramParent(WithParent):
    """A parent that reads the text: at slot j it predicts `follows[token at j - 1]` (the prompt's last token
    before slot 0), so its prediction changes when the slot before it is repaired."""

    def __init__(self, tokens: list[int], vocab: int, follows: dict[int, int]):
        super().__init__(tokens, tokens, vocab)
        self.follows, self.vocab = follows, vocab

    def parent_read(self, canvas, first: int, end: int) -> torch.Tensor:
        before = canvas.ids[:, canvas.prompt_width + first - 1:canvas.prompt_width + end - 1]
        out = torch.full((*before.shape, self.vocab), math.log(1e-4 / self.vocab))
        for (row, slot), token in zip(torch.cartesian_prod(*map(torch.arange, before.shape)).tolist(),
                                      before.flatten().tolist()):
            out[row, slot, self.follows.get(token, 0)] = 0.0
        return out.log_softmax(-1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lad.finetune import main as finetune

    out = tmp_path_factory.mktemp("polish") / "run"
    assert finetune([str(REPO / "recipes" / "tiny.yaml"), "max_steps=20", f"output_dir={out}", "eval_every=0",
                     "save_every=0"]) == 0
    return out


REFERENCE = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 105, 46, 257]


@pytest.mark.parametrize("edit", EDITS)
def test_an_oracle_repairs_every_kind_of_corruption_in_one_pass(byte_tokenizer, edit):
    pool = torch.tensor(REFERENCE)
    x = torch.tensor(REFERENCE)
    apply_edit(x, edit, 0.4, MASK, pool, torch.Generator().manual_seed(1))
    assert (x != pool).any(), "the corruption must corrupt something for the test to mean anything"
    oracle = Oracle(REFERENCE, len(byte_tokenizer))
    after = bench_refine.polish_rows(oracle, byte_tokenizer, "fix me", x[None], [1, 2, 4], chat_template=False)
    counts = bench_refine.repair_counts(pool, x, after[4][0])
    assert counts["repaired"] == counts["corrupted"] > 0 and counts["damaged"] == 0 and counts["edits_after"] == 0
    assert counts["edits_before"] > 0 and oracle.calls == 2  # the second pass changed nothing: polishing stopped


def test_apply_edit_does_what_each_edit_says():
    ref = torch.arange(10, 30)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    swapped = ref.clone()
    apply_edit(swapped, "swap", 1.0, MASK, ref, gen())
    assert swapped[:4].tolist() == [11, 10, 13, 12]  # every position starts a swap; overlapping ones are skipped
    masked = ref.clone()
    apply_edit(masked, "mask", 1.0, MASK, ref, gen())
    assert (masked == MASK).all()
    duplicated = ref.clone()
    apply_edit(duplicated, "duplicate", 0.05, MASK, ref, torch.Generator().manual_seed(0))  # one event
    j = int((duplicated != ref).nonzero()[0]) - 1
    assert duplicated[j] == duplicated[j + 1] and duplicated[j + 2:].tolist() == ref[j + 1:-1].tolist()
    replaced = ref.clone()
    apply_edit(replaced, "replace", 1.0, MASK, torch.tensor([7]), gen())
    assert (replaced == 7).all()
    with pytest.raises(ValueError, match="edit must be one of"):
        apply_edit(ref.clone(), "delete", 0.5, MASK, ref, gen())


def test_polish_never_changes_a_draft_the_model_is_certain_of(byte_tokenizer):
    oracle = Oracle(REFERENCE, len(byte_tokenizer), p=0.6)
    canvas = build_canvas(byte_tokenizer, ["a", "b"], len(REFERENCE), MASK, chat_template=False)
    canvas.answer.copy_(torch.tensor([REFERENCE, REFERENCE]))
    steps = [[], []]
    assert polish_canvas(oracle, canvas, 5, steps=steps, first_iteration=7, nfe=3) == 1
    assert canvas.answer.tolist() == [REFERENCE, REFERENCE]
    assert steps[0][0].iteration == 7 and steps[0][0].nfe == 4 and not any(steps[0][0].changed)
    editable = torch.zeros_like(canvas.answer, dtype=torch.bool)
    canvas.answer[:, 0] = 5
    assert polish_canvas(oracle, canvas, 3, editable=editable) == 1 and canvas.answer[0, 0] == 5  # nothing editable
    with pytest.raises(ValueError, match="polish must be >= 0"):
        polish_canvas(oracle, canvas, -1)


def test_polish_after_each_strategy_counts_traces_and_reaches_a_fixed_point(run_dir):
    denoiser, tokenizer = load(run_dir)
    for strategy in ("confidence", "refine", "threshold", "ar"):
        (draft,) = generate(denoiser, "What is 2+2?", tokenizer=tokenizer, strategy=strategy, max_new_tokens=12,
                            trace=True)
        (polished,) = generate(denoiser, "What is 2+2?", tokenizer=tokenizer, strategy=strategy, max_new_tokens=12,
                               trace=True, polish=4, polish_with="denoiser", polish_keep=1.0)
        assert 1 <= polished.polish_forwards <= 4 and polished.nfe == draft.nfe + polished.polish_forwards
        assert len(polished.steps) == len(draft.steps) + polished.polish_forwards  # one forward per pass
        (filled,) = generate(denoiser, "What is 2+2?", tokenizer=tokenizer, strategy=strategy, max_new_tokens=12,
                             trace=True, polish=4)  # the defaults: the parent is asked in a pass that flags a slot
        passes = len(filled.steps) - len(draft.steps)
        # a pass: the denoiser's forward, then the parent's, one per slot it changes (12 at most) and one more
        assert 1 <= passes <= 4 and passes <= filled.polish_forwards <= passes * (1 + 12 + 1)
        assert filled.nfe == draft.nfe + filled.polish_forwards
        if draft.steps:
            assert polished.steps[len(draft.steps)].iteration == draft.steps[-1].iteration + 1
        assert polished.to_dict(with_steps=False)["polish_forwards"] == polished.polish_forwards
        if polished.polish_forwards < 4:  # it stopped because a pass changed nothing: polishing again cannot move it
            (again,) = polish(denoiser, tokenizer, [polished], 2, max_new_tokens=12, keep=1.0, with_="denoiser",
                              chat_template=denoiser.info.chat_template)
            assert again.text == polished.text and again.polish_forwards == 1
    (plain,) = generate(denoiser, "What is 2+2?", tokenizer=tokenizer, strategy="confidence", max_new_tokens=12)
    assert plain.polish_forwards == 0 and "polish_forwards" not in plain.to_dict()
    with pytest.raises(ValueError, match="polish must be >= 0, got -2"):
        generate(denoiser, "x", tokenizer=tokenizer, polish=-2)


def test_cli_polish_flag(run_dir):
    def lad_generate(*argv):
        return subprocess.run([sys.executable, "-m", "lad.generate", "--model", str(run_dir), "--prompt", "Hi",
                               "--max-new-tokens", "8", *argv], capture_output=True, text=True, cwd=REPO)

    done = lad_generate("--polish", "2", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    # a pass: the denoiser's forward, and where it flags a slot the parent's, one per slot changed and one more
    assert record["polish"] == 2 and 1 <= record["polish_forwards"] <= 2 * (1 + 8 + 1)
    assert (record["polish_keep"], record["polish_with"], record["polish_doubt"]) == (0.2, "parent", 1.0)  # defaults
    for with_ in ("denoiser", "parent"):  # keep 1 flags every slot the model is not sure of
        done = lad_generate("--polish", "1", "--polish-with", with_, "--polish-keep", "1", "--json")
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["polish_with"] == with_
        assert record["polish_forwards"] == 1 if with_ == "denoiser" else record["polish_forwards"] >= 2
    for flag, value, message in (("--polish", "-1", "--polish must be >= 0, got -1"),
                                 ("--polish-keep", "1.5", "--polish-keep must be in [0, 1], got 1.5"),
                                 ("--polish-doubt", "2", "--polish-doubt must be in [0, 1], got 2.0"),
                                 ("--polish-with", "oracle", "argument --polish-with: invalid choice: 'oracle' (choose "
                                                             "from 'denoiser', 'parent', 'both') (see lad-generate "
                                                             "--help)")):
        bad = lad_generate(flag, value)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"lad-generate: error: {message}"]


def test_parent_mistakes_are_the_parents_likeliest_wrong_tokens(run_dir):
    denoiser, tokenizer = load(run_dir)
    ref = list(b"Hello world, hi.")
    choices = bench_refine.parent_mistakes(denoiser, tokenizer, "Say hi", ref, denoiser.info.chat_template, k=4)
    assert choices.shape == (len(ref), 4)
    assert not (choices == torch.tensor(ref)[:, None]).any()  # never the right token
    assert not set(choices.flatten().tolist()) & set(tokenizer.all_special_ids)
    rows, _ = bench_refine.corrupted(ref, [1.0], denoiser.mask_id, choices, seed=0)
    replaced = rows[list(EDITS).index("replace")]
    assert all(int(t) in choices[j].tolist() for j, t in enumerate(replaced))  # every slot drew from its own


def test_bench_counts_and_report_table(byte_tokenizer):
    ref, before = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 9, 3, 4])
    assert bench_refine.repair_counts(ref, before, torch.tensor([1, 2, 3, 5])) == {
        "corrupted": 1, "repaired": 1, "intact": 3, "damaged": 1, "edits_before": 1, "edits_after": 1}
    assert bench_refine.levenshtein([1, 2, 3], [2, 3]) == 1 and bench_refine.levenshtein([], [4, 5]) == 2
    oracle = Oracle(REFERENCE, len(byte_tokenizer))
    refs = [{"source": "builtin", "prompt": "fix me", "ids": REFERENCE}]
    result = bench_refine.bench_run(oracle, byte_tokenizer, False, refs, [0.3], [1, 2], eos={257}, judge=False)
    assert {(c["edit"], c["passes"]) for c in result["cells"]} == {(e, p) for e in EDITS for p in (0, 1, 2)}
    for cell in result["cells"]:
        shares = bench_refine.shares(cell)
        if cell["passes"]:
            assert shares["repaired"] in (None, 1.0) and shares["damaged"] == 0 and shares["edits"] == 0
        else:
            assert shares["edits"] == shares["edits_before"] > 0 or cell["corrupted"] == 0
    record = {"label": "oracle", **result, "reference_ppl": 1.0}
    for cell in record["cells"]:
        cell["parent_ppl"] = 1.0  # the table prints it
    table = bench_refine.table([record], 0.3)
    assert "| oracle | 1 | swap | 100% / 100% | 0.0% / 0.0% |" in table


def test_bench_splits_counts_by_reference_source(byte_tokenizer):
    """The split by source (the parent's answers vs corpus answers) adds up to the totals, and the report says
    each source's shares."""
    oracle = Oracle(REFERENCE, len(byte_tokenizer))
    refs = [{"source": source, "prompt": "fix me", "ids": REFERENCE} for source in ("builtin", "corpus", "corpus")]
    result = bench_refine.bench_run(oracle, byte_tokenizer, False, refs, [0.3], [1], eos={257}, judge=False)
    for cell in result["cells"]:
        split = cell["by_source"]
        assert split["builtin"]["answers"] == 1 and split["corpus"]["answers"] == 2
        for name in ("corrupted", "repaired", "intact", "damaged", "edits_before", "edits_after"):
            assert split["builtin"][name] + split["corpus"][name] == cell[name]
    table = bench_refine.source_table([{"label": "oracle", **result}], 0.3)
    assert "| oracle | replace | 100% / 0.0% | 100% / 0.0% |" in table
    old = [{k: v for k, v in c.items() if k != "by_source"} for c in result["cells"]]  # a record from before
    assert bench_refine.source_table([{"label": "old", "cells": old}], 0.3) == ""


def test_keep_leaves_the_tokens_the_model_finds_likely_enough(byte_tokenizer):
    oracle = Oracle(REFERENCE, len(byte_tokenizer), p=0.6)
    wrong = list(REFERENCE)
    wrong[2] = REFERENCE[3]  # the oracle gives it (1 - 0.6) / (vocab - 1): far below 0.01
    canvas = build_canvas(byte_tokenizer, ["a"], len(REFERENCE), MASK, chat_template=False)
    canvas.answer.copy_(torch.tensor([wrong]))
    assert polish_canvas(oracle, canvas, 1, keep=0.01) == 1 and canvas.answer[0].tolist() == REFERENCE
    canvas.answer.copy_(torch.tensor([wrong]))
    assert polish_canvas(oracle, canvas, 1, keep=0.0) == 1 and canvas.answer[0].tolist() == wrong  # keeps all
    with pytest.raises(ValueError, match=r"^polish_keep must be in \[0, 1\], got 2.0$"):
        polish_canvas(oracle, canvas, 1, keep=2.0)


def test_polish_with_the_parent_fills_the_slots_the_denoiser_flags(byte_tokenizer):
    wrong = list(REFERENCE)
    wrong[2], wrong[5] = 7, 8
    guess = list(REFERENCE)
    guess[2] = 9  # the denoiser flags slot 2 but would fill it with a wrong token; the parent has the right one
    vocab = len(byte_tokenizer)

    def polished(with_, keep=0.01):
        model = WithParent(guess, REFERENCE, vocab)
        canvas = build_canvas(byte_tokenizer, ["a"], len(REFERENCE), MASK, chat_template=False)
        canvas.answer.copy_(torch.tensor([wrong]))
        spent = polish_canvas(model, canvas, 3, keep=keep, with_=with_)
        return canvas.answer[0].tolist(), spent, model

    answer, spent, model = polished("denoiser")
    assert answer[2] == 9 and answer[5] == REFERENCE[5] and model.parent_calls == 0
    answer, spent, model = polished("parent")
    assert answer == REFERENCE  # the second pass flags slot 2 again, the parent keeps it: nothing changed, so it ends
    # the parent reads 16 slots a forward, left to right: pass 1 reads [0, 16) and changes slot 2, reads [3, 17)
    # and changes 5, reads [6, 17); pass 2 reads [0, 16) and [16, 17), changing nothing
    assert (model.calls, model.parent_calls, spent) == (2, 5, 7)
    sure = WithParent(REFERENCE, wrong, vocab)  # the denoiser flags nothing: the parent is never asked
    canvas = build_canvas(byte_tokenizer, ["a"], len(REFERENCE), MASK, chat_template=False)
    canvas.answer.copy_(torch.tensor([REFERENCE]))
    assert polish_canvas(sure, canvas, 3, keep=0.01, with_="parent") == 1 and sure.parent_calls == 0
    assert canvas.answer[0].tolist() == REFERENCE
    answer, spent, model = polished("both")  # slot 2: the two disagree, each gives the other's token 0.01/vocab
    assert answer[5] == REFERENCE[5] and answer[2] in (9, REFERENCE[2])
    assert model.parent_calls >= 1 and spent == model.calls + model.parent_calls
    with pytest.raises(ValueError, match=r"^polish_with must be one of"):
        polish_canvas(model, build_canvas(byte_tokenizer, ["a"], 4, MASK, chat_template=False), 1, with_="oracle")


def test_polish_with_both_takes_the_token_the_two_models_agree_on(byte_tokenizer):
    vocab = len(byte_tokenizer)
    draft = list(REFERENCE)
    draft[4] = 7  # both models give it almost nothing: the denoiser flags it
    model = WithParent(REFERENCE, REFERENCE, vocab)
    small = math.log(1e-6)
    for table, first in ((model.table, 65), (model.parent.table, 67)):  # denoiser: A .5, B .4; parent: C .5, B .4
        table[4] = small
        table[4, first], table[4, 66] = math.log(0.5), math.log(0.4)
    answers = {}
    for with_ in ("denoiser", "parent", "both"):
        canvas = build_canvas(byte_tokenizer, ["a"], len(REFERENCE), MASK, chat_template=False)
        canvas.answer.copy_(torch.tensor([draft]))
        polish_canvas(model, canvas, 1, keep=0.05, with_=with_)
        answers[with_] = canvas.answer[0].tolist()
        assert [t for j, t in enumerate(answers[with_]) if j != 4] == [t for j, t in enumerate(draft) if j != 4]
    assert (answers["denoiser"][4], answers["parent"][4], answers["both"][4]) == (65, 67, 66)  # B: .16 against .5e-6


def test_the_parent_fills_left_to_right_reading_the_repaired_text(byte_tokenizer):
    vocab = len(byte_tokenizer)
    canvas = build_canvas(byte_tokenizer, ["a"], 6, MASK, chat_template=False)
    last = int(canvas.ids[0, canvas.prompt_width - 1])  # the prompt's last token: what slot 0 is read after
    reference = [65, 66, 67, 68, 69, 70]
    follows = dict(zip([last, *reference], reference))  # the parent continues the reference from any slot of it
    model = BigramParent(reference, vocab, follows)
    canvas.answer.copy_(torch.tensor([[65, 90, 91, 68, 69, 70]]))  # two wrong slots in a row; the denoiser flags both
    polish_canvas(model, canvas, 1, keep=0.5, with_="parent")
    # at once, slot 2 would be read after the wrong 90 (the parent's token there: 0); left to right it follows the
    # repaired 66, so one pass repairs both
    assert canvas.answer[0].tolist() == reference


def test_doubt_keeps_a_flagged_token_the_parent_finds_likely(byte_tokenizer):
    vocab = len(byte_tokenizer)
    draft = list(REFERENCE)
    draft[4] = 7  # the denoiser flags it; the parent prefers 67 (0.6) but gives 7 0.3 after the text before it
    model = WithParent(REFERENCE, REFERENCE, vocab)
    model.table[4] = math.log(1e-6)
    model.table[4, 65] = 0.0
    model.parent.table[4] = math.log(0.1 / vocab)
    model.parent.table[4, 67], model.parent.table[4, 7] = math.log(0.6), math.log(0.3)
    answers = {}
    for doubt in (1.0, 0.5, 0.2):
        canvas = build_canvas(byte_tokenizer, ["a"], len(REFERENCE), MASK, chat_template=False)
        canvas.answer.copy_(torch.tensor([draft]))
        polish_canvas(model, canvas, 1, keep=0.05, with_="parent", doubt=doubt)
        answers[doubt] = canvas.answer[0].tolist()
    assert answers[1.0][4] == answers[0.5][4] == 67 and answers[0.2] == draft  # 0.3 >= 0.2: the parent agrees
    with pytest.raises(ValueError, match=r"^polish_doubt must be in \[0, 1\], got 1.5$"):
        polish_canvas(model, canvas, 1, with_="parent", doubt=1.5)


@pytest.mark.parametrize("attention, gate, kind", [("prompt_causal", None, "llama"), ("block_causal", "masked", "llama"),
                                               ("bidirectional", None, "mistral")])
def test_parent_reader_reads_as_the_parent_does_uncached(byte_tokenizer, attention, gate, kind):
    """The cached left-to-right reading (`Denoiser.parent_reader`) gives the parent's own distributions: those of
    one uncached causal forward over the canvas as it stands, after a slot changed too; prompts of two lengths
    (left padding), any attention mode, a gated adapter, sliding windows."""
    from conftest import make_tiny_model, with_lora
    from lad.modeling.denoiser import Denoiser

    extra = {"sliding_window": 3} if kind == "mistral" else {}
    model = with_lora(make_tiny_model(kind, seed=0, **extra), seed=0)
    denoiser = Denoiser(model, MASK, shift=True, attention=attention, gate=gate,
                        block_size=4 if attention == "block_causal" else None).eval()
    canvas = build_canvas(byte_tokenizer, ["Hi", "a longer prompt here"], 12, MASK, chat_template=False)
    canvas.answer.copy_(torch.randint(0, 250, canvas.answer.shape, generator=torch.Generator().manual_seed(0)))

    def uncached():
        rows, width = canvas.answer.shape
        logits = denoiser.parent_logits_at(canvas.ids, canvas.attention_mask, canvas.positions)
        return logits.float().log_softmax(-1).view(rows, width, -1)

    with denoiser.parent_reader(canvas) as read:
        torch.testing.assert_close(read(0, 8), uncached()[:, :8], atol=1e-4, rtol=1e-4)
        canvas.answer[:, 5] = 42
        torch.testing.assert_close(read(5, 12), uncached()[:, 5:], atol=1e-4, rtol=1e-4)
        canvas.answer[1, 2] = MASK  # a draft may hold the mask token: the parent reads it as text, the adapter off
        torch.testing.assert_close(read(2, 12), uncached()[:, 2:], atol=1e-4, rtol=1e-4)


def test_bench_polishes_with_the_filler_it_is_given(byte_tokenizer):
    pool = torch.tensor(REFERENCE)
    x = torch.tensor(REFERENCE)
    apply_edit(x, "replace", 0.4, MASK, pool, torch.Generator().manual_seed(1))
    shown = x.tolist()  # a denoiser that believes the corrupted draft flags nothing; one that guesses wrong flags all
    guess = [t + 1 if t < 255 else t - 1 for t in REFERENCE]
    for denoiser_table, with_, repaired in ((guess, "parent", True), (guess, "denoiser", False),
                                            (shown, "parent", False)):
        model = WithParent(denoiser_table, REFERENCE, len(byte_tokenizer))
        after = bench_refine.polish_rows(model, byte_tokenizer, "fix me", x[None], [1], chat_template=False,
                                         keep=0.5, with_=with_)
        assert (after[1][0].tolist() == REFERENCE) is repaired


def test_frontier_joins_the_keeps_of_one_run_and_filler(tmp_path):
    def cell(keep, repaired, damaged):
        return {"rate": 0.1, "edit": "replace", "passes": 1, "keep": keep, "corrupted": 10, "repaired": repaired,
                "intact": 100, "damaged": damaged, "answers": 1, "edits_before": 0, "edits_after": 0}

    records = [{"label": "run_keeps", "run": "r", "cells": [cell(0.2, 3, 1)]},
               {"label": "run", "run": "r", "cells": [cell(1.0, 5, 4), cell(0.05, 2, 0)]},
               {"label": "run_both", "run": "r", "polish_with": "both", "cells": [cell(0.2, 4, 1)]},
               {"label": "run_both_lr", "run": "r", "polish_with": "both", "polish_order": "left_to_right",
                "polish_doubt": 0.5, "cells": [cell(0.2, 6, 1)]}]
    got = bench_refine.frontiers(records, 0.1, "replace")
    assert got == {"run": ("denoiser", [(0.04, 0.5), (0.01, 0.3), (0.0, 0.2)]),
                   "run_both": ("both, at once", [(0.01, 0.4)]),
                   "run_both_lr": ("both, left to right, doubt 0.5", [(0.01, 0.6)])}
    bench_refine.plot(records, 0.1, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_polish_with_the_parent_needs_one(run_dir):
    from dataclasses import replace as changed

    from lad.run import RunDirError

    denoiser, tokenizer = load(run_dir)
    (draft,) = generate(denoiser, "Hi", tokenizer=tokenizer, max_new_tokens=8)
    (filled,) = polish(denoiser, tokenizer, [draft], 2, max_new_tokens=8, with_="parent",
                       chat_template=denoiser.info.chat_template)
    assert 2 <= filled.polish_forwards <= 2 * (1 + 8 + 1)  # the denoiser's forward and the parent's per pass
    denoiser.info = changed(denoiser.info, merged=True)
    with pytest.raises(RunDirError, match="exported .merged. model"):
        polish(denoiser, tokenizer, [draft], 1, max_new_tokens=8, with_="both")


def test_gen_quality_compares_draft_plus_polish_at_its_forwards(run_dir, tmp_path):
    from eval import gen_quality
    from lad.quality import agreement

    assert agreement([[1, 2, 3]], [[1, 5, 3, 4]]) == 0.5 and agreement([[]], [[]]) is None
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    assert gen_quality.main(["--model", str(run_dir), "--prompts", "2", "--iters", "2", "--strategies", "confidence",
                             "--polish", "2", "--polish-with", "denoiser", "--max-new-tokens", "8", "--out", str(out),
                             "--plot", str(png)]) == 0
    record = json.loads(out.read_text())
    plain, polished = record["sweep"]["confidence"][0], record["sweep"]["confidence + polish 2"][0]
    assert record["ar"]["parent_agreement"] == 1.0 and 0 <= polished["parent_agreement"] <= 1
    assert plain["mean_nfe_per_batch"] < polished["mean_nfe_per_batch"] <= plain["mean_nfe_per_batch"] + 2
    assert png.stat().st_size > 0


def test_bench_refuses_to_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    other = tmp_path / "mask.json"
    other.write_text('{"command": "python eval/gen_quality.py"}')
    with pytest.raises(SystemExit) as stop:
        bench_refine.main(["--runs", str(tmp_path / "run"), "--labels", "mask", "--out-dir", str(tmp_path)])
    assert stop.value.code == 2 and "is not a repair-benchmark record" in capsys.readouterr().err
    assert other.read_text() == '{"command": "python eval/gen_quality.py"}'
