"""How good generated answers are, judged the one way every benchmark and report uses: the AR parent's perplexity
of them, distinct-n, length; and the fixed prompt set they answer (LAD's built-in prompts).

The parent is the run's own weights with the adapter off and causal attention, the model a LAD run started from:
the judge of fluency that a diffusion model must not fall below (eval/gen_quality.py, eval/bench_generation.py).
"""

from __future__ import annotations

import math
import statistics

import torch


def builtin_texts() -> list[str]:
    """LAD's built-in prompts (lad/data/builtin_prompts.jsonl), each as an `instruction` row renders it:
    the instruction, then its input after a blank line."""
    from .distill.prompts import builtin_prompts

    return [f"{p.instruction}\n\n{p.input}" if p.input else p.instruction for p in builtin_prompts()]


def distinct_n(answers: list[list[int]], n: int) -> float | None:
    """Distinct n-grams over all n-grams of all answers (corpus level): low means repetitive output."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@torch.no_grad()
def answer_nll(denoiser, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 8) -> list[float]:
    """Summed negative log-likelihood of each answer given its prompt under the run's AR parent (adapter off,
    causal attention): `lad.scoring.ar.score_ar`, the scorer lad-eval's parent uses; 0 for an empty answer."""
    from .scoring.ar import score_ar

    scored = [i for i, a in enumerate(answers) if a]
    values = score_ar(denoiser, [(prompts[i], answers[i]) for i in scored], batch_size=batch_size) if scored else []
    out = [0.0] * len(answers)
    for i, (logprob, _) in zip(scored, values):
        out[i] = -logprob
    return out


def agreement(answers: list[list[int]], references: list[list[int]]) -> float | None:
    """Share of token positions where an answer holds its reference's token, over the longer of the two
    (a missing token disagrees): how close answers are to the parent's own, position by position."""
    pairs = [(a, r) for a, r in zip(answers, references) if a or r]
    if not pairs:
        return None
    return sum(sum(x == y for x, y in zip(a, r)) for a, r in pairs) / sum(max(len(a), len(r)) for a, r in pairs)


def perplexity(nll: list[float], lengths: list[int]) -> float | None:
    """exp(total NLL / total tokens): token-weighted, so long answers count per token."""
    tokens = sum(lengths)
    return math.exp(sum(nll) / tokens) if tokens else None


def answer_quality(denoiser, tokenizer, prompts: list[str], answers: list[list[int]], chat_template) -> dict:
    """Parent perplexity, distinct-1/2 and length of answers (token ids before EOS) to prompts, rendered as the
    samplers render them."""
    from .sampling.common import render_prompt

    rendered = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    nll = answer_nll(denoiser, rendered, answers)
    lengths = [len(a) for a in answers]
    return {"parent_ppl": perplexity(nll, lengths), "distinct_1": distinct_n(answers, 1),
            "distinct_2": distinct_n(answers, 2), "mean_answer_tokens": statistics.mean(lengths) if lengths else 0,
            "empty_answers": sum(not a for a in answers), "answers": len(answers)}
