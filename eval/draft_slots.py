"""How far ahead can a LAD run draft? Per-slot agreement of its one-forward draft with the parent's own text.

For held-out built-in prompts (from `--offset`, unseen by the block recipes' distillation), the parent answers
greedily; at cut points along each answer the run drafts `--slots` tokens in one forward (the text up to the cut
read causally, mask slots after it: exactly a `speculative` round's draft, lad/sampling/speculative.py), and slot
i counts as right when it is the parent's token at cut + i. A speculative round keeps the drafted tokens up to the
first wrong one, so these rates bound its acceptance. On a gated run with the shift, slot 0 is read from the last
clean column, the parent itself: it is right by construction (the round's own token), and drafting starts at slot 1.

    python -m eval.draft_slots --runs runs/smollm2_135m_block runs/smollm2_135m_gated \
        --out eval/results/generation/draft_slots.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.common import command_line, environment, load_denoiser, prompt_set, quiet, write_record  # noqa: E402


def slot_agreement(run: str, prompts: list[str], slots: int, cuts: range) -> dict:
    """{"run", "gated", "drafts", "agreement": [rate per slot]} for one run."""
    from transformers import DynamicCache

    from lad.modeling.gate import parent_switch
    from lad.sampling import get_strategy
    from lad.sampling.common import prepare, row_generators

    speculative = importlib.import_module("lad.sampling.speculative")  # the package's name is the function
    denoiser, tokenizer, chat_template, _ = load_denoiser(run)
    answers = get_strategy("ar")(denoiser, tokenizer, prompts, max_new_tokens=cuts.stop + slots,
                                 chat_template=chat_template)
    hits, drafts = torch.zeros(slots), 0
    greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    with torch.no_grad(), parent_switch(denoiser) as gate:
        for prompt, answer in zip(prompts, answers):
            for cut in cuts:
                reference = answer.token_ids[cut:cut + slots]
                if len(reference) < slots:
                    break
                text = speculative._Text(prepare(denoiser, tokenizer, [prompt], slots, chat_template=chat_template), 0)
                text.accept(torch.tensor([answer.token_ids[:cut]]), torch.tensor([cut]))
                _, tokens, _ = speculative._draft(denoiser, gate, text, DynamicCache(), slots, row_generators(1, 0),
                                                  greedy)
                hits += (tokens[0].cpu() == torch.tensor(reference)).float()
                drafts += 1
    return {"run": run, "gated": denoiser.gated, "drafts": drafts,
            "agreement": [round(float(h) / max(drafts, 1), 4) for h in hits]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--offset", type=int, default=160)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--cuts", type=int, nargs=3, default=[2, 64, 6], metavar=("FIRST", "STOP", "STEP"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    quiet()
    every, source = prompt_set()
    prompts = every[args.offset:args.offset + args.prompts]
    rows = [slot_agreement(run, prompts, args.slots, range(*args.cuts)) for run in args.runs]
    for row in rows:
        print(f"{Path(row['run']).name} ({'gated' if row['gated'] else 'ungated'}, {row['drafts']} drafts): "
              + " ".join(f"{a:.2f}" for a in row["agreement"]), flush=True)
    write_record(args.out, {"what": "per-slot agreement of one-forward drafts with the parent's greedy text",
                            "command": command_line("-m eval.draft_slots", argv), "environment": environment(),
                            "prompt_source": f"{source}[{args.offset}:{args.offset + args.prompts}]",
                            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
