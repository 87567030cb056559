"""`lad-generate` (or `lad generate`): the command line of lad/generate.py's `generate`.

Every sampling flag, its help and its range check come from lad/sampling/options.py; options not given are left
out, so each strategy keeps its own defaults.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

import torch

from .console import Parser, device_problem, guarded, printable, quiet_libraries
from .defaults import POLISH_DOUBT, POLISH_KEEP, POLISH_WITH
from .generate import DEFAULT_BATCH_SIZE, GenerateError, ar_generate, generate, load, toy_note, trace_dict
from .sampling import PARENT_STRATEGIES, STRATEGIES, Generation, default_strategy, get_strategy, split_options, \
    strategy_options
from .sampling.common import eos_token_ids
from .sampling.options import OPTIONS, POLISH_OPTIONS, add_option_flags, flag, option_problem
from .sampling.render import LiveView

PROG = "lad-generate"
NOT_FLAGS = {"chat_template", "on_step", "trace"}  # options the CLI sets itself (from the run, --show, --json)
# every other option a strategy declares (its signature) is a flag of the same name; default None: "not given, the
# strategy's own default". A test checks that each one has its flag, so a new option cannot go missing here.
_DECLARED = set().union(*(strategy_options(s) for s in STRATEGIES)) - NOT_FLAGS
OPTION_FLAGS = {name: flag(name) for name in OPTIONS if name in _DECLARED}  # in the table's order


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
    add_option_flags(how, [*OPTION_FLAGS, *POLISH_OPTIONS], defaults={"polish": 0, "polish_keep": POLISH_KEEP,
                                                                         "polish_with": POLISH_WITH,
                                                                         "polish_doubt": POLISH_DOUBT})
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
    """Every flag's range (from lad/sampling/options.py), then what the flags need together."""
    for name in [*OPTION_FLAGS, *POLISH_OPTIONS]:
        problem = option_problem(name, getattr(args, name), flag(name))
        if problem:
            raise GenerateError(problem)
    checks = [
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (not 0 <= args.pause < float("inf"), f"--pause must be a number of seconds >= 0, got {args.pause}"),
        (not args.prompt and not args.prompts_file, "give at least one --prompt or a --prompts-file"),
    ]
    for bad, message in checks:
        if bad:
            raise GenerateError(message)
    problem = device_problem(args.device)
    if problem:
        raise GenerateError(problem)


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
    if args.polish:
        from .sampling.polish import check_filler

        check_filler(info, args.polish_with, args.model, "--polish-with")


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
                        polish=args.polish, polish_keep=args.polish_keep, polish_with=args.polish_with,
                        polish_doubt=args.polish_doubt, on_step=view, trace=args.json, **options)
        ars = ar_generate(denoiser, tokenizer, batch, chat_template=denoiser.info.chat_template,
                          **options) if args.ar else [None] * len(batch)
        for i, (gen, ar) in enumerate(zip(gens, ars)):
            if args.json:
                record = {**trace_dict(gen, tokenizer, cache), "options": options}
                if args.polish:
                    record.update(polish=args.polish, polish_keep=args.polish_keep, polish_with=args.polish_with,
                                  polish_doubt=args.polish_doubt)
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
