"""Self-distillation (lad/distill.py): batched greedy answers equal HF `generate` on each prompt alone, seeded
sampling does not depend on the batch, a killed run resumes to the very file an uninterrupted run writes, the
output trains as `format: instruction` with the prompt the parent answered, and bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EOS_ID, PAD_ID, make_tiny_model

from lad import cli
from lad.data import encode_rows, load_rows, prompt_ids
from lad.data.formats import instruction_messages
from lad.distill import DistillError, Prompt, builtin_prompts, distill, main, read_prompts
from lad.modeling.byte_tokenizer import build_byte_tokenizer

PROMPTS = ["hi", "What is 2+2?", "Name a color.", "Tell me a story about a fox.", "x", "Why?", "abc def",
           "Plan a trip.", Prompt("Summarize this.", "A cat sat on a mat all day.", "summarize")]
NEW = 16


def parent():
    """A tiny random LLaMA whose EOS row copies (slightly scaled) the row of byte 'm', so greedy answers end at
    different lengths and some run to max_new_tokens."""
    model = make_tiny_model()
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = model.lm_head.weight[ord("m")] * 1.02
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS_ID, PAD_ID
    return model


@pytest.fixture
def model():
    return parent()


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def run(model, out, prompts=PROMPTS, **options):
    options = {"max_new_tokens": NEW, "batch_size": 3, "progress": False, **options}
    return distill(model, prompts, out, tokenizer=build_byte_tokenizer(), model_name="tiny", **options)


class GenerateSpy:
    """Wraps `model.generate`: records the unpadded prompts it was given; can fail on the n-th call (a kill)."""

    def __init__(self, model, fail_on: int | None = None):
        self.model, self.inner, self.fail_on, self.calls, self.prompts = model, model.generate, fail_on, 0, []
        model.generate = self

    def __call__(self, *, input_ids, attention_mask, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.prompts += [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_greedy_batched_rows_equal_generate_on_each_prompt_alone(model, tmp_path):
    tokenizer = build_byte_tokenizer()
    result = run(model, tmp_path / "d.jsonl")
    got = rows(tmp_path / "d.jsonl")
    assert [r["instruction"] for r in got] == [p if isinstance(p, str) else p.instruction for p in PROMPTS]
    assert result.generated == result.rows == len(PROMPTS) and result.skipped == 0
    for r in got:
        ids = prompt_ids(instruction_messages(r["instruction"], r["input"]), tokenizer)
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID)[0, len(ids):].tolist()
        cut = out.index(EOS_ID) if EOS_ID in out else len(out)
        assert r["output"] == tokenizer.decode(out[:cut], skip_special_tokens=True)
        assert (r["finish"], r["tokens"]) == (("eos", cut) if EOS_ID in out else ("length", NEW))
        assert r["source"] == "distill" and r["model"] == "tiny" and r["settings"]["sampling"] == "greedy"
    assert {r["finish"] for r in got} == {"eos", "length"}  # both ways of stopping are exercised
    assert result.eos == sum(r["finish"] == "eos" for r in got)
    assert result.new_tokens == sum(r["tokens"] + (r["finish"] == "eos") for r in got)
    assert got[-1]["input"] == "A cat sat on a mat all day." and got[-1]["category"] == "summarize"


def test_sampling_is_seeded_per_prompt_not_per_batch(model, tmp_path):
    one = run(model, tmp_path / "b1.jsonl", sample=True, seed=1, batch_size=1, temperature=1.0)
    four = run(model, tmp_path / "b4.jsonl", sample=True, seed=1, batch_size=4, temperature=1.0)
    assert one.generated == four.generated == len(PROMPTS)
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "b4.jsonl").read_bytes()
    run(model, tmp_path / "s2.jsonl", sample=True, seed=2, batch_size=4, temperature=1.0)
    outputs = lambda name: [r["output"] for r in rows(tmp_path / name)]  # noqa: E731
    assert outputs("s2.jsonl") != outputs("b1.jsonl")
    run(model, tmp_path / "g.jsonl")
    assert outputs("g.jsonl") != outputs("b1.jsonl")  # sampling really samples
    assert rows(tmp_path / "b1.jsonl")[0]["settings"]["sampling"] == {"temperature": 1.0, "top_p": 0.95,
                                                                      "top_k": 0, "seed": 1}


def test_killed_run_resumes_to_the_uninterrupted_file_without_redoing_rows(model, tmp_path):
    run(model, tmp_path / "full.jsonl")
    out = tmp_path / "d.jsonl"
    spy = GenerateSpy(model, fail_on=3)  # killed while generating the third batch
    with pytest.raises(KeyboardInterrupt):
        run(model, out)
    done = rows(out)
    assert len(done) == 6  # two batches of 3, fsynced before the kill
    spy.fail_on, spy.prompts = None, []
    result = run(model, out)
    assert (result.skipped, result.generated) == (6, len(PROMPTS) - 6)
    assert len(spy.prompts) == len(PROMPTS) - 6  # the done prompts were not generated again
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()  # same rows, same order
    again = run(model, out)
    assert (again.generated, again.skipped) == (0, len(PROMPTS)) and len(spy.prompts) == len(PROMPTS) - 6


def test_subset_then_full_set_and_a_torn_last_line(model, tmp_path):
    run(model, tmp_path / "full.jsonl")
    out = tmp_path / "d.jsonl"
    run(model, out, prompts=PROMPTS[:4])
    with open(out, "ab") as f:
        f.write(b'{"instruction": "Name a co')  # the kill came in the middle of a write
    result = run(model, out)
    assert (result.skipped, result.generated) == (4, len(PROMPTS) - 4)
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    # rows of prompts not asked for this time are kept, after the asked ones
    run(model, out, prompts=PROMPTS[2:5])
    assert [r["instruction"] for r in rows(out)][:3] == PROMPTS[2:5] and len(rows(out)) == len(PROMPTS)


def test_other_settings_or_other_content_are_refused_before_generating(model, tmp_path):
    out = tmp_path / "d.jsonl"
    run(model, out, max_new_tokens=8)
    before = out.read_bytes()
    spy = GenerateSpy(model)
    with pytest.raises(DistillError, match=r"other settings \(max_new_tokens: 8 there, 9 here\)"):
        run(model, out, max_new_tokens=9)
    with pytest.raises(DistillError, match="sampling"):
        run(model, out, max_new_tokens=8, sample=True)
    with pytest.raises(DistillError, match="system_prompt"):
        run(model, out, max_new_tokens=8, system_prompt="Be brief.")
    foreign = tmp_path / "alpaca.jsonl"
    foreign.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    with pytest.raises(DistillError, match="already holds other content"):
        run(model, foreign)
    assert out.read_bytes() == before and foreign.read_text().count("\n") == 1 and spy.calls == 0


def test_output_trains_as_instruction_format_with_the_prompt_the_parent_answered(model, tmp_path):
    out, system = tmp_path / "d.jsonl", "You are terse."
    spy = GenerateSpy(model)
    run(model, out, system_prompt=system)
    tokenizer = build_byte_tokenizer()
    data = load_rows(str(out))
    examples, stats = encode_rows(data, tokenizer, fmt="instruction", max_length=512, system_prompt=system)
    nonempty = [r for r in data if r["output"]]
    assert stats.kept == len(examples) == len(nonempty) > 0
    rendered = [prompt_ids(instruction_messages(r["instruction"], r["input"], system), tokenizer) for r in data]
    assert sorted(spy.prompts) == sorted(rendered)  # what the parent answered ...
    assert [e.prompt_ids for e in examples] == [p for p, r in zip(rendered, data) if r["output"]]  # ... trains
    for example, row in zip(examples, nonempty):
        assert example.answer_ids == list(row["output"].encode()) + [EOS_ID]
        assert example.prompt_ids[:len(system) + 1] == [tokenizer.convert_tokens_to_ids("<|system|>"),
                                                        *system.encode()]


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \nfirst\n", encoding="utf-8")
    assert read_prompts(txt) == [Prompt("first"), Prompt("second"), Prompt("first")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"instruction": "Sum up.", "input": "text", "category": "summarize"}\n\n{"prompt": "Hi"}\n')
    assert read_prompts(jsonl) == [Prompt("Sum up.", "text", "summarize"), Prompt("Hi")]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    with pytest.raises(DistillError, match=r"bad.jsonl:2: needs a non-empty string field 'instruction'"):
        read_prompts(tmp_path / "bad.jsonl")


def test_duplicate_prompts_are_answered_once(model, tmp_path):
    result = run(model, tmp_path / "d.jsonl", prompts=["a", "b", "a"])
    assert result.rows == result.generated == 2


def test_builtin_prompt_set():
    prompts = builtin_prompts()
    assert len(prompts) >= 400
    normalised = {(" ".join(p.instruction.lower().split()), " ".join(p.input.lower().split())) for p in prompts}
    assert len(normalised) == len(prompts)  # no duplicates, not even by case or spacing
    categories = {}
    for p in prompts:
        assert p.instruction.strip() and p.category
        categories[p.category] = categories.get(p.category, 0) + 1
    assert len(categories) >= 15 and min(categories.values()) >= 20
    assert {"science", "history", "geography", "arithmetic", "word_problem", "reasoning", "story",
            "poem", "summarize", "rewrite"} <= set(categories)
    assert sum(bool(p.input) for p in prompts) >= 40  # rewriting / summarising a given text
    assert len({p.category for p in prompts[:64]}) == len(categories)  # any prefix (--limit) spans them all
    assert read_prompts("builtin") == prompts


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "parent"
    parent().save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def test_cli_writes_resumes_and_reports(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(p for p in PROMPTS if isinstance(p, str)), encoding="utf-8")
    out = tmp_path / "d.jsonl"
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8",
            "--batch-size", "4", "--quiet"]
    assert main(argv) == 0
    assert len(rows(out)) == 8 and rows(out)[0]["model"] == str(model_dir)
    assert "8 rows (8 generated, 0 already done)" in capsys.readouterr().out
    assert cli.main(["distill", *argv, "--limit", "3"]) == 0
    assert "8 rows (0 generated, 3 already done)" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read prompts file"),
    ("empty", "holds no prompts"),
    ("latin1", "not valid UTF-8"),
    ("model", "model not found: ./no/such/model"),
    ("temperature", "--temperature apply only with --sample"),
    ("suffix", "prompts must be 'builtin', a .txt file"),
    ("settings", "was distilled with other settings"),
])
def test_cli_errors_are_one_line_exit_2(case, message, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("Hello\n", encoding="utf-8")
    files = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "latin1": tmp_path / "l.txt",
             "suffix": tmp_path / "p.csv"}
    files["empty"].write_text("\n \n")
    files["latin1"].write_bytes("caf\u00e9\n".encode("latin-1"))
    files["suffix"].write_text("Hello\n")
    out = tmp_path / "d.jsonl"
    model = "./no/such/model" if case == "model" else "pkg://lad/data/builtin_prompts.jsonl"
    if case == "settings":
        out.write_text(json.dumps({"instruction": "Hello", "input": "", "output": "", "source": "distill",
                                   "key": "k", "settings": {"max_new_tokens": 3}}) + "\n")
    argv = ["--model", model, "--prompts", str(files.get(case, good)), "--out", str(out)]
    argv += ["--temperature", "0.5"] if case == "temperature" else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lad-distill: error:") and message in err, err
