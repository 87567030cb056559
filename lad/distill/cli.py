"""`lad distill` / `lad-distill`: flags checked before the model loads, then `distill`."""

from __future__ import annotations

import argparse
import sys


from ..console import Parser, guarded, log_to_terminal, quiet_libraries

from .answers import distill
from .prompts import PROG, DistillError


# ---------------------------------------------------------------- CLI



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description="Make the AR parent answer prompts; write an "
                     "`instruction` dataset (JSONL) that any recipe can train on. Resumable.")
    parser.add_argument("--model", required=True, help="hub id, folder, .gguf file or pkg://PACKAGE/FILE")
    parser.add_argument("--prompts", required=True, help="'builtin', a .txt file (one per line) or a .jsonl file")
    parser.add_argument("--out", required=True, help="output .jsonl (appended; rerun the same command to resume)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="with --sample (default 0.7)")
    parser.add_argument("--top-p", type=float, help="with --sample (default 0.95)")
    parser.add_argument("--top-k", type=int, help="with --sample (default 0: off)")
    parser.add_argument("--seed", type=int, help="with --sample (default 0)")
    parser.add_argument("--system-prompt", help="as the recipe's data.system_prompt (default none)")
    parser.add_argument("--chat-template", choices=("auto", "true", "false"), default="auto",
                        help="as the recipe's data.chat_template")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Numbers the generation would refuse once the model is loaded, refused now and named by their flag."""
    from ..console import device_problem

    checks = [
        (args.max_new_tokens < 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.limit is not None and args.limit < 1, f"--limit must be >= 1, got {args.limit}"),
        (args.temperature is not None and not 0 < args.temperature < float("inf"),
         f"--temperature must be > 0 (sampling), got {args.temperature}"),
        (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.top_k is not None and args.top_k < 0, f"--top-k must be >= 0 (0 = off), got {args.top_k}"),
    ]
    problem = next((message for bad, message in checks if bad), None) or device_problem(args.device)
    if problem:
        raise DistillError(problem)


def run(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_p", "top_k", "seed") if getattr(args, k) is not None]
    if given and not args.sample:
        raise DistillError(f"{', '.join(given)} apply only with --sample (decoding is greedy by default)")
    check_flags(args)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "seed") if getattr(args, k) is not None}
    template = {"auto": "auto", "true": True, "false": False}[args.chat_template]
    result = distill(args.model, args.prompts, args.out, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, sample=args.sample, system_prompt=args.system_prompt,
                     chat_template=template, limit=args.limit, dtype=args.dtype, device=args.device,
                     progress=not args.quiet, **sampling)
    r = result.to_dict()
    print(f"{result.out}: {result.rows} rows ({result.generated} generated, {result.skipped} already done); "
          f"{result.new_tokens} tokens in {r['seconds']} s (model load {r['load_seconds']} s): "
          f"{r['prompts_per_s']} prompts/s, {r['tokens_per_s']} tokens/s, EOS share {r['eos_share']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_terminal(f"{PROG}: %(message)s")  # above our progress bar, not glued onto it
    quiet_libraries()  # weight-loading bars and library warnings; our bar is the one that matters
    return guarded(PROG, lambda: run(args),
                   on_interrupt="the rows written so far are kept: rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
