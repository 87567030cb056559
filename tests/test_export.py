"""`lad export` on tiny runs: merged logits equal the adapter's, same seeded text, plain transformers loads the
folder bidirectionally, the model card, and refused cases that write nothing."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lad.evaluation import save as save_eval
from lad.export import export_run, main, model_card
from lad.generate import generate
from lad.run import LadInfo, load_run

REPO = Path(__file__).resolve().parents[1]
# fp32 merge (W + B·A folded once) against the adapter's x·W + x·A·B: only rounding differs (measured up to
# 1.7e-5 on logits of magnitude ~1-5); the same weights through plain transformers agree to 1e-6
ATOL = 1e-4


def train_tiny(root: Path, *options: str) -> Path:
    from lad.finetune import main as finetune

    out = root / "run"
    assert finetune([str(REPO / "recipes" / "tiny.yaml"), "max_steps=4", "eval_every=0", "save_every=0",
                     f"output_dir={out}", *options]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """shift off with a spare mask token; shift on with an added <|mask|> row (PEFT trainable tokens); full."""
    root = tmp_path_factory.mktemp("export")
    return {"noshift": train_tiny(root / "a"), "shift": train_tiny(root / "b", "shift=true", "mask_token=<|mask|>"),
            "full": train_tiny(root / "c", "lora.enabled=false")}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: export_run(run, root / name, dtype="fp32", say=lambda _: None).out for name, run in runs.items()}


def batch(seed: int = 0):
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


@pytest.mark.parametrize("name", ["noshift", "shift", "full"])
def test_merged_logits_equal_the_adapter_model(runs, exported, name):
    run_model, _, run_info = load_run(runs[name])
    merged, _, info = load_run(exported[name])
    assert info.merged and not run_info.merged and info.shift == run_info.shift == (name == "shift")
    assert info.mask_token_id == run_info.mask_token_id and merged.mask_id == run_model.mask_id
    assert not hasattr(merged.model, "peft_config")  # no adapter: the folder's own weights
    ids, mask = batch()
    ids[:, 5:8] = info.mask_token_id  # the mask row is read too (an added row is trained through PEFT)
    with torch.no_grad():
        expected, got = run_model(ids, mask), merged(ids, mask)
    real = mask.bool()
    if info.shift:
        real[:, 0] = False  # position 0 is never predicted with shift
    assert torch.allclose(got[real], expected[real], atol=ATOL, rtol=0)
    if name != "full":
        assert (got[real] - expected[real]).abs().max() > 0  # really merged, not the same graph
        with torch.no_grad(), run_model.model.disable_adapter():
            base = run_model(ids, mask)
        assert (base[real] - expected[real]).abs().max() > 100 * ATOL  # the adapter matters


@pytest.mark.parametrize("name", ["noshift", "shift"])
def test_seeded_generation_gives_the_same_text(runs, exported, name):
    prompts = ["What is 2+2?", "Name a colour."]
    for strategy, options in (("refine", dict(temperature=1.0, seed=3)), ("confidence", dict(seed=1))):
        a = generate(str(runs[name]), prompts, strategy=strategy, iters=6, max_new_tokens=10, **options)
        b = generate(str(exported[name]), prompts, strategy=strategy, iters=6, max_new_tokens=10, **options)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.text for g in a] == [g.text for g in b]


@pytest.mark.parametrize("name", ["noshift", "shift"])
def test_plain_transformers_loads_a_bidirectional_model(exported, name):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    info = json.loads((exported[name] / "lad.json").read_text())
    assert plain.config.is_causal is False
    assert json.loads((exported[name] / "config.json").read_text())["is_causal"] is False
    denoiser, _, _ = load_run(exported[name])
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        ours = denoiser(ids)
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 256
        later = plain(input_ids=changed).logits
    keep = torch.arange(logits.shape[-1]) != info["mask_token_id"]  # the Denoiser zeroes the mask's probability
    if info["shift"]:  # the prediction for token i is read at position i-1
        assert torch.allclose(logits[:, :-1][..., keep], ours[:, 1:][..., keep], atol=1e-6, rtol=0)
    else:
        assert torch.allclose(logits[..., keep], ours[..., keep], atol=1e-6, rtol=0)
    assert (later[:, 0] - logits[:, 0]).abs().max() > 1e-4  # position 0 sees the last token: bidirectional


def test_folder_contents_lad_json_and_card(runs, exported):
    out, run = exported["shift"], runs["shift"]
    names = visible_files(out)
    assert "lad.json" in names and "config.json" in names and "README.md" in names and "recipe.yaml" in names
    assert "tokenizer.json" in names
    assert not [n for n in names if n.startswith("adapter_") or n.endswith((".bin", ".pt"))]
    assert [n for n in names if n.endswith(".safetensors")]
    assert not [n for n in siblings(out) if n.startswith(".")]  # staging folder renamed away
    info, source = LadInfo.load(out), LadInfo.load(run)
    assert info.merged and info.adapter == "lora" and info.step == source.step == 4
    assert (info.mask_token, info.mask_token_id, info.mask_token_added) == ("<|mask|>", source.mask_token_id, True)
    assert info.base_model["name_or_path"] == "…/base"  # a shared folder names no folder of the exporting machine
    for name in ("lad.json", "recipe.yaml", "README.md", "config.json"):
        assert str(run.parent.resolve()) not in (out / name).read_text(), name
    assert info.extra["export"]["dtype"] == "fp32" and info.extra["export"]["source"] == f"…/{run.resolve().name}"
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "lad" in meta["tags"] and "base_model" not in meta  # local base
    assert "| mask token | `<\\|mask\\|>` (id 266, added to the vocabulary) |" in body  # pipes escaped in a table
    assert "| shift | `true`: token i is predicted at position i-1 |" in body
    assert "| training | LoRA r=16, alpha=32, targets all-linear; 4 optimizer steps; max_length 128 |" in body
    assert "No evaluation results" in body
    assert "shift: true" in body.split("## Recipe")[1]  # the recipe used
    assert "converted from a randomly initialised model" in body


def test_nothing_machine_local_in_the_card_and_one_file_mode(runs, exported):
    """A shared folder: the card names no folder of the exporting machine (lad.json keeps the provenance), and
    the weights are as readable as the files beside them (safetensors writes them owner-only)."""
    out, run = exported["noshift"], runs["noshift"]
    card = (out / "README.md").read_text(encoding="utf-8")
    for local in (str(run.resolve()), str(run.resolve().parent), str(REPO), str(Path.home())):
        assert local not in card
    assert "path: …/tiny_tasks.jsonl" in card and "output_dir: …/run" in card
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    modes = {p.name: mode(p) for p in out.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
    assert mode(run / "adapter_model.safetensors") == mode(run / "lad.json")  # the run's own files too
    assert mode(run / "base" / "model.safetensors") == mode(run / "base" / "config.json")


def test_the_run_folders_card_says_what_it_is(runs):
    card = (runs["noshift"] / "README.md").read_text(encoding="utf-8")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "peft" and "lad" in meta["tags"] and "base_model" not in meta  # scratch base
    assert "Model Card for Model ID" not in card and "# A LAD run: LoRA adapter" in body
    assert "lad-generate --model RUN_DIR" in body and str(runs["noshift"]) not in card


def test_card_lists_the_run_eval_results_and_hub_base(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["noshift"], run)
    result = {"results": {"arc_easy": {"acc,none": 0.42, "acc_stderr,none": 0.03, "acc_norm,none": 0.4,
                                       "acc_norm_stderr,none": 0.031}},
              "config": {"score": "denoise", "iters": 16, "order": "l2r", "limit": 200}}
    parent = {"results": {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.035}}, "config": {"limit": 200}}
    # per-document results of both (as lad-eval --compare logs them): LAD right on 3 of 4, the parent on 1 of 4
    result["samples"] = {"arc_easy": [{"doc_id": i, "acc": float(i < 3), "acc_norm": 1.0} for i in range(4)]}
    parent["samples"] = {"arc_easy": [{"doc_id": i, "acc": float(i == 3), "acc_norm": 1.0} for i in range(4)]}
    result["n-samples"] = {"arc_easy": {"original": 570, "effective": 4}}
    save_eval({"lad": result, "ar": parent}, "table", str(run / "eval"))  # what lad-eval --output_path RUN/eval writes
    out = export_run(run, tmp_path / "model", dtype="fp32", say=lambda _: None).out
    _, front, body = (out / "README.md").read_text().split("---\n", 2)
    how = "LAD (denoise, l2r order, 16 iters)"
    assert f"| arc_easy | acc | 0.4200 ± 0.0300 | {how} | 4 | +0.5000 [-0.5000, +1.0000] p=0.62 |" in body
    assert f"| arc_easy | acc_norm | 0.4000 ± 0.0310 | {how} | 4 | +0.0000 [+0.0000, +0.0000] p=1 |" in body
    assert "| arc_easy | acc | 0.5000 ± 0.0350 | AR parent | 200 | - |" in body
    info = LadInfo.load(out)  # a hub base goes into the metadata (not loaded here: the card only names it)
    info.base_model["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta = yaml.safe_load(model_card(run, info, "m").split("---\n", 2)[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"


def test_bf16_export_halves_the_size_and_loads(runs, exported, tmp_path, capsys):
    assert main([str(runs["noshift"]), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "saving bf16" in capsys.readouterr().out
    out = tmp_path / "bf16"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    size = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out) < 0.55 * size(exported["noshift"])
    merged, _, info = load_run(out)
    full, _, _ = load_run(exported["noshift"])
    assert info.extra["export"]["dtype"] == "bf16"
    ids, mask = batch()
    with torch.no_grad():
        a, b = merged(ids, mask)[mask.bool()], full(ids, mask)[mask.bool()]
    assert a.dtype == torch.float32  # computed in the run's precision (fp32 on CPU) from bf16 weights
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_auto_dtype_and_cli_entry_point(runs, tmp_path, capsys):
    from lad.cli import main as lad

    assert lad(["export", str(runs["full"]), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "nothing to merge, saving fp32" in out and "wrote" in out  # auto: the tiny base is fp32
    assert LadInfo.load(tmp_path / "m").extra["export"]["from_adapter"] == "full"


def test_qlora_run_merges_into_the_unquantized_base(runs, exported, tmp_path, capsys):
    run = tmp_path / "qrun"
    shutil.copytree(runs["noshift"], run)
    info = json.loads((run / "lad.json").read_text())
    info["base_model"]["quantization"] = "4bit"  # as a QLoRA run records it
    (run / "lad.json").write_text(json.dumps(info))
    assert main([str(run), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "trained with QLoRA (4bit base): merging into the base reloaded in fp32, not into 4bit weights" in printed
    merged, _, got = load_run(tmp_path / "m")
    reference, _, _ = load_run(exported["noshift"])
    assert got.extra["export"]["base_quantization"] == "4bit"
    ids, mask = batch()
    with torch.no_grad():  # 4-bit weights would move the logits far more than this
        assert torch.allclose(merged(ids, mask)[mask.bool()], reference(ids, mask)[mask.bool()], atol=ATOL, rtol=0)


def test_exported_folder_has_no_ar_parent_and_one_set_of_weights(exported, capsys):
    from lad.generate import main as lad_generate

    assert lad_generate(["--model", str(exported["noshift"]), "--prompt", "hi", "--iters", "2", "--ar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported (merged) model" in err[0] and "AR parent" in err[0]
    argv = ["--model", str(exported["noshift"]), "--prompt", "hi", "--iters", "2", "--polish", "1"]
    assert lad_generate([*argv, "--polish-with", "both"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lad-generate: error: --polish-with both fills from the AR parent")
    assert err[0].endswith("(--polish-with denoiser)")
    assert lad_generate([*argv, "--polish-with", "denoiser"]) == 0
    with pytest.raises(ValueError, match="one set of weights"):
        load_run(exported["noshift"], weights="best")


def test_lad_eval_scores_the_exported_folder_like_the_run(runs, exported, tmp_path, capsys):
    from lad.evaluation import main as lad_eval

    rows = [{"id": f"q{i}", "question": f"Which number is {i}?", "choices": {"text": [str(i), str(i + 1)],
             "label": ["A", "B"]}, "answerKey": "A"} for i in range(3)]
    (tmp_path / "data" / "arc_easy").mkdir(parents=True)
    (tmp_path / "data" / "arc_easy" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {}
    for name, model in (("run", runs["shift"]), ("exported", exported["shift"])):
        assert lad_eval(["--model", str(model), "--tasks", "arc_easy", "--data-dir", str(tmp_path / "data"),
                         "--iters", "2", "--output_path", str(tmp_path / name / "r.json")]) == 0
        scores[name] = json.loads((tmp_path / name / "r.json").read_text())["lad"]["results"]["arc_easy"]
    assert scores["run"]["acc,none"] == scores["exported"]["acc,none"]
    assert scores["run"]["acc_norm,none"] == scores["exported"]["acc_norm,none"]
    capsys.readouterr()
    assert lad_eval(["--model", str(exported["shift"]), "--tasks", "arc_easy", "--data-dir", str(tmp_path / "data"),
                     "--compare"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (lm-eval logs, bars too)
    assert len(err) == 1 and err[0].startswith("lad-eval: error:")
    assert "exported (merged) model: it holds no separate AR parent" in err[0]


def test_old_lad_json_without_merged_field_reads_as_a_run(runs, tmp_path):
    data = json.loads((runs["noshift"] / "lad.json").read_text())
    del data["merged"]
    (tmp_path / "lad.json").write_text(json.dumps(data))
    assert LadInfo.load(tmp_path).merged is False


# ---------------------------------------------------------------- refused: one line, exit 2, nothing written


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lad-export: error: "), captured.err
    return lines[0]


def test_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "adapter_config.json").write_text("{}")
    assert "is not a LAD run: no lad.json" in refused(capsys, [str(tmp_path / "notarun"), "--out", str(tmp_path / "o")])
    assert "is not a folder" in refused(capsys, [str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert siblings(tmp_path / "o") == ["notarun"]


def test_refuses_an_occupied_out_and_replaces_only_an_earlier_export(runs, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = refused(capsys, [str(runs["noshift"]), "--out", str(out)])
    assert "already holds files: choose another folder" in line
    line = refused(capsys, [str(runs["noshift"]), "--out", str(out), "--overwrite"])  # the user's files stay
    assert "it holds files LAD did not write (notes.txt)" in line
    assert visible_files(out) == ["notes.txt"] and siblings(out) == ["o"]
    (out / "notes.txt").unlink()
    assert main([str(runs["noshift"]), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "already holds a LAD export: pass --overwrite" in refused(capsys, [str(runs["noshift"]), "--out", str(out)])
    assert main([str(runs["noshift"]), "--out", str(out), "--overwrite", "--dtype", "fp32"]) == 0
    assert LadInfo.load(out).merged and siblings(out) == ["o"]


def test_refuses_writing_over_the_run_itself(runs, capsys):
    for target in (runs["noshift"], runs["noshift"].parent):
        assert "would replace the run" in refused(capsys, [str(runs["noshift"]), "--out", str(target), "--overwrite"])
    assert LadInfo.load(runs["noshift"]).merged is False


def test_refuses_a_dtype_that_cannot_hold_the_weights(runs, tmp_path, capsys):
    run = tmp_path / "big"
    shutil.copytree(runs["full"], run)
    weights = load_file(str(run / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # beyond fp16's 65504
    save_file(weights, str(run / "model.safetensors"), metadata={"format": "pt"})
    line = refused(capsys, [str(run), "--out", str(tmp_path / "o" / "m"), "--dtype", "fp16"])
    assert "do not fit fp16: model.layers.0.mlp.up_proj.weight overflows" in line and "bf16 or fp32" in line
    assert not (tmp_path / "o").exists()  # not even the parent folder


def test_refuses_an_unknown_dtype_and_a_full_disk(runs, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    line = refused(capsys, [str(runs["noshift"]), "--out", str(tmp_path / "o"), "--dtype", "fp8"])
    assert "--dtype: invalid choice: 'fp8'" in line
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    line = refused(capsys, [str(runs["noshift"]), "--out", str(tmp_path / "o"), "--dtype", "fp32"])
    assert "GB are free at" in line and "the model needs" in line
    assert siblings(tmp_path / "o") == []


def test_a_full_finetune_has_no_parent_either():
    from lad.run import LadInfo, RunDirError, check_parent

    info = LadInfo(base_model={}, mask_token="<m>", mask_token_id=1, mask_token_added=False, vocab_size=10,
                   shift=False, objective="mask", noise={}, adapter="full")
    with pytest.raises(RunDirError, match="no adapter to switch off"):
        check_parent(info, "runs/full")
    check_parent(dataclasses.replace(info, adapter="lora"), "runs/lora")  # a LoRA run has its parent
