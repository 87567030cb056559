"""The settings LAD's measurements chose, stated once (docs/results.md; docs/choosing.md says why each).

The recipe schema's defaults, a run's recommended sampler and scoring order, and the CLIs', the demo's and the
training report's defaults all come from here, so a recipe without these keys gets the best known settings and
every tool reads a run the same way. Change a default here, with the measurement that moved it.
"""

from __future__ import annotations

ATTENTION = "prompt_causal"  # the prompt read as the parent read it: SmolLM2 ARC-E 0.30 → 0.44 untrained, parity after
SHIFT = True  # the AR head stays aligned: best left-to-right scores in the ablation
OBJECTIVE = "mask"  # structural and mixed noise bought nothing at 80 steps (the ablation)
SCORE_ORDER = "l2r"  # lad-eval: left to right scored best (most-confident first trails by ~0.045 on ARC-C, HellaSwag)
BLOCK_SIZE = 4  # attention block_causal: at an equal budget (40 steps) blocks of 4 wrote best (parent ppl 6.2, against
#                 14.4 for 8 and 20.4 for 16) and scored best left to right (ARC-E 0.540 / 0.500 / 0.495); the
#                 block-size ablation of docs/results.md
ITERS = 16  # the samplers' iterations (lad-generate, the demo, the report, lad-eval's generative tasks)
SCORE_ITERS = None  # lad-eval likelihoods: one token per reveal step, the exact chain rule. 16 steps scored the
#                     hour run's HellaSwag endings 0.3 nats per character below its parent (acc_norm -0.045);
#                     one per token: a within-document correlation of 0.994 with the parent (docs/results.md)
MC_SAMPLES = 128  # lad-eval --score elbo: Monte-Carlo samples per choice (LLaDA's setting for multiple choice)
DRAFT_LENGTH = 4  # speculative: tokens drafted per round (provisional, until the draft-length sweep chooses)
MAX_DRAFT = 16  # speculative with adaptive=True: the longest draft
MAX_NEW_TOKENS = 64  # the answer length of lad-generate, the demo and the training report
POLISH_KEEP = 0.2  # --polish: a slot keeps its token when the denoiser gives it at least this probability. With
#                   POLISH_WITH, one pass of the 320-step draft_local run repairs 44% of replaced tokens while
#                   damaging 1.4% of right ones (keep 0.05: 35%, 0.9%; 0.3: 48%, 2.4%; 0.5: 63%, 3.6%); issue 31
POLISH_WITH = "parent"  # --polish: a flagged slot takes the AR parent's greedy token, filled left to right. It
#                         repaired the most (44%; the product `both` 39%, the denoiser 29%, each at keep 0.2 with
#                         1.4-1.5% damaged), 33% of held-out answers' replacements (both 31%). docs/results.md
POLISH_DOUBT = 1.0  # --polish with a parent filler: a flagged slot changes only where the parent, reading the
#                     repaired text before it, gives its token less than this (1: the denoiser's flag alone)
#                     (off: at keep 0.5 with the product filling, doubt 0.01 repaired 50% with 3.3% damaged, on
#                     the frontier keep alone draws; eval/results/repair/prototypes/left_to_right.json)


def strategy_for(objective: str) -> str:
    """The sampler a run is best read with, from its training objective: `confidence` (commit the most confident
    masked slots, never rewrite) for the mask objective, which never saw a wrong token to fix; `refine`, which can
    rewrite any token, for runs trained to repair wrong tokens (`structural` or `mixed` noise)."""
    return "confidence" if objective == "mask" else "refine"
