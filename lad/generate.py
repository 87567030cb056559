"""Generate from a LAD run by iterative denoising: `lad-generate --model RUN_DIR --prompt "..."` (or `lad generate`).

    lad-generate --model runs/tiny --prompt "What is the capital of France?" --iters 16 --show
    lad-generate --model runs/tiny --prompts-file questions.jsonl --batch-size 8 --json > trace.jsonl
    lad-generate --model runs/tiny --prompt "2+2?" --strategy confidence --block-length 8 --ar

Python API (see docs/sampling.md):

    from lad.generate import generate, load
    gens = generate("runs/tiny", ["What is 2+2?"], strategy="refine", iters=16, max_new_tokens=32)
    denoiser, tokenizer = load("runs/tiny")           # load once, then call generate(denoiser, ...) many times
    gens = generate(denoiser, "Hello", tokenizer=tokenizer, seed=1)

Options are passed to the strategy function as keyword arguments; a strategy ignores those it does not use
(the CLI says so on stderr). Options the user did not give are left out, so each strategy keeps its defaults.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

import torch

from .console import Parser, guarded, printable, quiet_libraries
from .defaults import POLISH_KEEP
from .sampling import (PARENT_STRATEGIES, STRATEGIES, Generation, default_strategy, get_strategy, split_options,
                       strategy_options)
from .sampling.common import eos_token_ids
from .sampling.polish import polish as polish_drafts
from .sampling.render import LiveView, decode_pieces

PROG = "lad-generate"
DEFAULT_BATCH_SIZE = 8


class GenerateError(ValueError):
    """A user error in what was asked for (prompts, options); reported as one line, exit status 2."""


# ---------------------------------------------------------------- Python API


def load(model: str | os.PathLike, *, device: str | torch.device | None = None, weights: str = "final"):
    """Load a run for repeated `generate` calls: (denoiser, tokenizer). The denoiser holds the run's settings
    (`denoiser.info`, from lad.json), so prompts are rendered as training rendered them."""
    from .run import load_run

    denoiser, tokenizer, _ = load_run(model, device=device, weights=weights)
    return denoiser, tokenizer


def _chat_template(denoiser, options: dict) -> bool | str:
    if options.get("chat_template") is not None:
        value = options.pop("chat_template")
        return value if value == "raw" else bool(value)
    options.pop("chat_template", None)
    return denoiser.info.chat_template if denoiser.info is not None else True


def generate(model, prompts: list[str] | str, *, strategy: str | None = None, tokenizer=None,
             batch_size: int | None = None, device: str | torch.device | None = None, weights: str = "final",
             polish: int = 0, polish_keep: float = POLISH_KEEP, on_step=None, trace: bool = False,
             **options) -> list[Generation]:
    """Answer `prompts` with `strategy` (default: the run's own, `default_strategy`); returns one `Generation`
    per prompt, in order.

    model: a run directory (loaded here; `device`, `weights` as for `load_run`) or a `Denoiser` (then
    `tokenizer` is required). Prompts run in batches of `batch_size` (default: 8). `options` go to the
    strategy (max_new_tokens, iters, seed, temperature, ...); `chat_template` defaults to the run's.
    `polish`: up to this many noiseless refinement passes over each finished draft (lad/sampling/polish.py), in
    which a slot keeps its token when the model gives it at least `polish_keep` probability.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise GenerateError("no prompts given")
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise GenerateError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(polish, bool) or not isinstance(polish, int) or polish < 0:
        raise GenerateError(f"polish must be an integer >= 0, got {polish!r}")
    if not 0 <= polish_keep <= 1:
        raise GenerateError(f"polish_keep must be in [0, 1], got {polish_keep!r}")
    if strategy is not None and strategy not in STRATEGIES:
        raise GenerateError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load(model, device=device, weights=weights)
        tokenizer = tokenizer or loaded_tokenizer
    elif tokenizer is None:
        raise GenerateError("generate(denoiser, ...) needs tokenizer=; or pass a run directory")
    strategy = strategy or default_strategy(model)
    chat_template = _chat_template(model, options)
    try:
        _, others = split_options(strategy, options)
    except ValueError as err:
        raise GenerateError(str(err)) from None
    if others:
        owners = ", ".join(s for s in STRATEGIES if set(others) <= strategy_options(s)) or "other strategies"
        raise GenerateError(f"strategy {strategy!r} does not take {', '.join(sorted(others))} (options of {owners})")
    fn = get_strategy(strategy)
    width = options.get("max_new_tokens", inspect.signature(fn).parameters["max_new_tokens"].default)
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        drafts = fn(model, tokenizer, prompts[start:start + batch_size], chat_template=chat_template,
                    on_step=on_step, trace=trace, **options)
        out += polish_drafts(model, tokenizer, drafts, polish, max_new_tokens=width, chat_template=chat_template,
                             keep=polish_keep, on_step=on_step, trace=trace)
    return out


def ar_generate(denoiser, tokenizer, prompts: list[str], *, chat_template: bool = True, **options) -> list[Generation]:
    """The AR parent's answers (adapter off, causal attention, HF `generate` with its KV cache): the `ar`
    strategy, given the same options (those it does not use are ignored)."""
    return get_strategy("ar")(denoiser, tokenizer, prompts, chat_template=chat_template,
                              **split_options("ar", options)[0])


def trace_dict(gen: Generation, tokenizer, cache: dict | None = None) -> dict:
    """`Generation.to_dict()` plus each step's decoded token strings ("pieces"; null where masked)."""
    out = gen.to_dict()
    cache = {} if cache is None else cache
    for step, record in zip(gen.steps, out["steps"]):
        pieces = decode_pieces(tokenizer, step.tokens, cache)
        record["pieces"] = [None if m else p for p, m in zip(pieces, step.masked)]
    return out


# ---------------------------------------------------------------- CLI



NOT_FLAGS = {"chat_template", "on_step", "trace"}  # options the CLI sets itself (from the run, --show, --json)
# every other option a strategy declares (its signature) is a flag of the same name; default None: "not given, the
# strategy's own default". A test checks that each one has its flag, so a new option cannot go missing here.
OPTION_FLAGS = {name: "--" + name.replace("_", "-")
                for name in sorted(set().union(*(strategy_options(s) for s in STRATEGIES)) - NOT_FLAGS)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog=PROG, description="Generate answers from a LAD run by iterative denoising.",
        epilog="Options a strategy does not use are ignored (with a note on stderr); options not given keep the "
               "strategy's defaults. See docs/sampling.md.")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a LAD run directory (holds lad.json)")
    parser.add_argument("--weights", default="final", metavar="{final,best,PATH}",
                        help="which weights of the run (default: final)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    what = parser.add_argument_group("prompts")
    what.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="one prompt per line, or JSON lines with a 'prompt' field ('-' reads stdin)")
    what.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per batch (default: 8)")
    how = parser.add_argument_group("sampling (defaults: the strategy's own)")
    how.add_argument("--strategy", choices=sorted(STRATEGIES),
                     help="default: the run's own: confidence for runs trained on the mask objective, refine for "
                          "structural or mixed noise (docs/sampling.md)")
    how.add_argument("--iters", type=int, help="iterations (forward passes at most)")
    how.add_argument("--max-new-tokens", type=int, help="answer slots on the canvas")
    how.add_argument("--seed", type=int, help="sampling seed (default 0)")
    how.add_argument("--temperature", type=float, help="0 = greedy")
    how.add_argument("--top-k", type=int, help="0 = off")
    how.add_argument("--top-p", type=float, help="1 = off")
    how.add_argument("--noise-start", type=float, help="refine: fraction re-masked after the first step (0..1)")
    how.add_argument("--schedule", choices=("linear", "exponential"), help="refine: how the re-mask fraction decays")
    how.add_argument("--remask", choices=("random", "confidence"),
                     help="refine: which slots are re-masked; confidence: which are committed")
    how.add_argument("--retention", choices=("none", "editable", "locked"), help="refine: kept slots")
    how.add_argument("--early-stop", type=int, help="stop after this many unchanged iterations (0 = off)")
    how.add_argument("--block-length", type=int, help="confidence, threshold: left-to-right blocks of this many slots")
    how.add_argument("--threshold", type=float, help="threshold: commit slots with confidence >= this")
    how.add_argument("--delay-eos", action="store_const", const=True, help="confidence, threshold: commit EOS last")
    how.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                     help="refine, confidence, threshold: compute the prompt's K/V once and run only the answer slots "
                          "(faster; approximate for a bidirectional run, exact for a prompt-causal one, where it is "
                          "on unless --no-prefix-cache)")
    how.add_argument("--block-cache", action="store_const", const=True,
                     help="confidence, threshold with --block-length: also freeze the rest of the answer's K/V while "
                          "a block is decoded, running only the block's slots per forward (Fast-dLLM's dual cache; "
                          "approximate; implies the prompt's cache)")
    how.add_argument("--carry", action=argparse.BooleanOptionalAction, default=None,
                     help="confidence, threshold on a block-causal run: a finished block joins the exact cache in the "
                          "next block's first forward (default), or in a forward of its own (--no-carry)")
    how.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=None,
                     help="confidence, threshold: stop once an answer's text is final (an EOS with every slot before "
                          "it committed); the same text in fewer forwards (default: on)")
    how.add_argument("--draft-length", type=int,
                     help="speculative: tokens the denoiser drafts per round, checked by the parent (default 4)")
    how.add_argument("--adaptive", action="store_const", const=True,
                     help="speculative: double the draft after a round kept in full, halve it after one mostly "
                          "rejected")
    how.add_argument("--max-draft", type=int, help="speculative with --adaptive: the longest draft (default 16)")
    how.add_argument("--polish", type=int, default=0, metavar="N",
                     help="any strategy: then up to N noiseless refinement passes over the finished draft, each "
                          "re-predicting every slot from the draft (stops when a pass changes nothing; default 0)")
    how.add_argument("--polish-keep", type=float, default=POLISH_KEEP, metavar="P",
                     help="with --polish: a slot keeps its token when the model gives it at least this probability "
                          f"(1 = every slot takes the greedy token; default {POLISH_KEEP:g})")
    out = parser.add_argument_group("output")
    out.add_argument("--show", action="store_true", help="show every step (masked red, changed green)")
    out.add_argument("--no-redraw", action="store_true", help="with --show: one line per step, not redrawn in place")
    out.add_argument("--pause", type=float, default=0.0, metavar="SECONDS", help="with --show: wait after each step")
    out.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="ANSI colours for --show (auto: when writing to a terminal and NO_COLOR is unset)")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt with the full step trace (--show then goes to stderr)")
    out.add_argument("--ar", action="store_true", help="also answer with the AR parent (adapter off) and time both")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.iters is not None and args.iters < 1, f"--iters must be >= 1, got {args.iters}"),
        (args.max_new_tokens is not None and args.max_new_tokens < 1,
         f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.polish < 0, f"--polish must be >= 0, got {args.polish}"),
        (not 0 <= args.polish_keep <= 1, f"--polish-keep must be in [0, 1], got {args.polish_keep}"),
        (args.draft_length is not None and args.draft_length < 1,
         f"--draft-length must be >= 1, got {args.draft_length}"),
        (args.max_draft is not None and args.max_draft < 1, f"--max-draft must be >= 1, got {args.max_draft}"),
        (args.temperature is not None and not args.temperature >= 0,  # NaN too
         f"--temperature must be >= 0, got {args.temperature}"),
        (args.top_k is not None and args.top_k < 0, f"--top-k must be >= 0, got {args.top_k}"),
        (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.noise_start is not None and not 0 <= args.noise_start <= 1,
         f"--noise-start must be in [0, 1], got {args.noise_start}"),
        (args.early_stop is not None and args.early_stop < 0,
         f"--early-stop must be >= 0 (0 = off), got {args.early_stop}"),
        (args.block_length is not None and args.block_length < 1,
         f"--block-length must be >= 1, got {args.block_length}"),
        (args.threshold is not None and not args.threshold >= 0, f"--threshold must be >= 0, got {args.threshold}"),
        (args.seed is not None and not -2**63 <= args.seed < 2**64,
         f"--seed must be a 64-bit integer, got {args.seed}"),
        (not 0 <= args.pause < float("inf"), f"--pause must be a number of seconds >= 0, got {args.pause}"),
        (not args.prompt and not args.prompts_file, "give at least one --prompt or a --prompts-file"),
    ]
    for bad, message in checks:
        if bad:
            raise GenerateError(message)
    problem = device_problem(args.device)
    if problem:
        raise GenerateError(problem)


def device_problem(device: str | None, flag: str = "--device") -> str | None:
    """Why `device` cannot run the model here (None when it can): checked before anything loads."""
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        return f"{flag} {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"{flag} {device}: no CUDA GPU is available to PyTorch here"
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"{flag} {device}: MPS is not available to PyTorch here"
    return None


def check_strategy_options(strategy: str | None, options: dict) -> None:
    """Flag combinations the strategy would refuse once the model is loaded, refused now and named by flag."""
    params = inspect.signature(get_strategy(strategy)).parameters if strategy else {}
    if "block_cache" in params and options.get("block_cache") and options.get("prefix_cache") is False:
        raise GenerateError("--block-cache needs the prompt's cache: do not combine it with --no-prefix-cache")
    block = options.get("block_length")
    if "block_length" not in params or block is None:
        return
    n = options.get("max_new_tokens", params["max_new_tokens"].default)
    iters = options.get("iters", params["iters"].default)
    default = "" if "max_new_tokens" in options else f", {strategy}'s default"
    if n % block:
        raise GenerateError(f"--block-length {block} must divide --max-new-tokens ({n}{default})")
    if iters < n // block:
        raise GenerateError(f"--iters {iters} is fewer than the {n // block} blocks of --block-length {block}: "
                            "every block needs at least one forward")


def check_before_loading(args: argparse.Namespace, options: dict) -> None:
    """What the run's lad.json settles before the model loads: the default strategy's options, and whether
    --ar has a parent to answer with (a lad.json that cannot be read is reported by the loading)."""
    from .run import LadInfo, RunDirError, check_parent

    try:
        info = LadInfo.load(args.model)
    except RunDirError:
        info = None
    strategy = args.strategy or (info.strategy if info else None)
    check_strategy_options(strategy, options)
    if (args.ar or strategy in PARENT_STRATEGIES) and info is not None:
        check_parent(info, args.model)


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line, or JSON lines (every line an object) with a "prompt" field."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GenerateError(f"cannot read --prompts-file {path}: {err}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise GenerateError(f"--prompts-file {path} holds no prompts")
    if not all(line.lstrip().startswith("{") for _, line in lines):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerateError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row.get("prompt"), str):
            fields = ", ".join(map(repr, row)) or "none"
            raise GenerateError(f"{path}:{n}: needs a string field 'prompt' (has {fields})")
        prompts.append(row["prompt"])
    return prompts


def given_options(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in OPTION_FLAGS if getattr(args, key) is not None}


def _plain(index: int | None, gen: Generation, ar: Generation | None) -> str:
    lines = [] if index is None else [f"[{index}] {gen.prompt}"]
    if ar is None:
        lines.append(gen.text)
    else:
        lines.append(f"lad ({gen.strategy}, {gen.forwards_text()}, {gen.seconds:.2f} s): {gen.text}")
        lines.append(f"ar  (parent, {ar.nfe} tokens, {ar.seconds:.2f} s): {ar.text}")
    return printable("\n".join(lines))


TOY_PARAMETERS = 1_000_000


def toy_note(denoiser) -> str | None:
    """What to expect from a model this small (recipes/tiny.yaml: 140k parameters, trained for seconds), said where
    its answers are shown so that noise is not taken for a broken install."""
    count = sum(p.numel() for p in denoiser.parameters())
    if count >= TOY_PARAMETERS:
        return None
    return (f"a {count:,}-parameter model answers with noise: it shows the pipeline working, not language "
            "(docs/scratch.md trains a small model that writes words)")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    options = given_options(args)
    check_before_loading(args, options)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, tokenizer = load(args.model, device=device, weights=args.weights)
    args.strategy = args.strategy or default_strategy(denoiser)
    options, others = split_options(args.strategy, options)
    if others:  # flags of another strategy: noted and left out, so one command line serves every strategy
        print(f"{PROG}: note: strategy {args.strategy!r} does not use {', '.join(OPTION_FLAGS[k] for k in others)}",
              file=sys.stderr)
    if args.ar or args.strategy in PARENT_STRATEGIES:
        from .run import check_parent

        check_parent(denoiser.info, args.model)
    note = toy_note(denoiser)
    if note:  # on stderr: a script reading the answers from stdout does not see it
        print(f"{PROG}: note: {note}", file=sys.stderr)
    view = None
    if args.show:
        stream = sys.stderr if args.json else sys.stdout
        color = args.color == "always" or (args.color == "auto" and stream.isatty() and not os.environ.get("NO_COLOR"))
        defaults = inspect.signature(get_strategy(args.strategy)).parameters
        iters = options.get("iters", defaults["iters"].default if "iters" in defaults else None)
        iters = None if args.strategy in PARENT_STRATEGIES else iters  # a step per token or round: no fixed total
        iters = iters + args.polish if iters else iters
        view = LiveView(tokenizer, denoiser.mask_id, stream=stream, color=color,
                        redraw=False if args.no_redraw else None, pause=args.pause, iters=iters,
                        eos_ids=eos_token_ids(tokenizer, denoiser))
    numbered = len(prompts) > 1
    cache: dict[int, str] = {}
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        if view is not None:
            view.reset([f"[{start + i + 1}]" for i in range(len(batch))] if numbered else None)
        gens = generate(denoiser, batch, strategy=args.strategy, tokenizer=tokenizer, batch_size=len(batch),
                        polish=args.polish, polish_keep=args.polish_keep, on_step=view, trace=args.json, **options)
        ars = ar_generate(denoiser, tokenizer, batch, chat_template=denoiser.info.chat_template,
                          **options) if args.ar else [None] * len(batch)
        for i, (gen, ar) in enumerate(zip(gens, ars)):
            if args.json:
                record = {**trace_dict(gen, tokenizer, cache), "options": options}
                if args.polish:
                    record["polish"], record["polish_keep"] = args.polish, args.polish_keep
                if ar is not None:
                    record["ar"] = ar.to_dict(with_steps=False)
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                if view is not None and not i:
                    print()  # the view's last frame, a blank line, then the answers plain
                print(_plain(start + i + 1 if numbered else None, gen, ar), flush=True)
                if numbered:
                    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    # GenerateError and lad.run.RunDirError are ValueErrors; strategies refuse bad options (--noise-start 2) so too
    return guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
