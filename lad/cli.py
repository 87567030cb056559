"""`lad SUBCOMMAND ...`: one entry point for the LAD commands (each also has its own `lad-*` script)."""

from __future__ import annotations

import sys

COMMANDS = {
    "finetune": ("lad.finetune", "train a denoiser from a recipe"),
    "generate": ("lad.generate", "answer prompts with a trained run (iterative denoising)"),
    "eval": ("lad.evaluation", "score a run with lm-evaluation-harness (ARC, MMLU, HellaSwag, ...)"),
    "distill": ("lad.distill", "make the AR parent answer prompts: a training set in its own words"),
    "export": ("lad.export", "merge a run's adapter into a standalone diffusion model folder"),
    "demo": ("lad.demo", "serve a browser page that shows a run denoising step by step"),
}


def usage() -> str:
    return "usage: lad COMMAND [ARGS ...]   (lad COMMAND --help for its options)\n\ncommands:\n" + \
        "".join(f"  {name:<10} {text}\n" for name, (_, text) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"lad {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        from .console import did_you_mean

        print(f"lad: error: unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; commands: "
              f"{', '.join(COMMANDS)} (see lad --help)", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
