"""After training: a few answers of the new denoiser next to its AR parent's, and a small score for both.

The score is the negative log-likelihood per token of held-out answers (the validation set), on the same tokens
and the same prompts for both models: the parent by its own left-to-right chain rule (`score_ar`), the denoiser
by denoising (`score_denoise`, left to right as lad-eval scores, `iters` reveal steps; exact when iters >= answer
length, otherwise several tokens are revealed per step). Lower is better. It says at a glance how much of the
parent's fit to this data the conversion kept, before any benchmark is run.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from .console import printable
from .defaults import ITERS, MAX_NEW_TOKENS


@dataclass
class Report:
    strategy: str
    iters: int
    answers: list[dict]  # {prompt, lad, ar, lad_seconds, ar_seconds}; ar None without a parent
    scored_examples: int
    lad_nll_per_token: float | None
    ar_nll_per_token: float | None

    def text(self, width: int = 100) -> str:
        parent = any(row["ar"] is not None for row in self.answers) or self.ar_nll_per_token is not None
        lines = [f"== after training: {self.strategy}, {self.iters} iterations"
                 + (", next to the AR parent ==" if parent else " ==")]
        for row in self.answers:
            lines.append(f"\n> {row['prompt']}")
            for name, seconds in (("lad", row["lad_seconds"]), ("ar", row["ar_seconds"])):
                if row[name] is None:
                    continue
                body = textwrap.fill(printable(" ".join(row[name].split())) or "(empty)", width, initial_indent="    ",
                                     subsequent_indent="    ")
                lines.append(f"  {name} ({seconds:.1f} s):\n{body}")
        if self.scored_examples:
            ar = f" | AR parent {self.ar_nll_per_token:.3f}" if self.ar_nll_per_token is not None else ""
            lines.append(f"\nanswer NLL per token on {self.scored_examples} validation examples (lower is better): "
                         f"LAD {self.lad_nll_per_token:.3f} (denoise, {self.iters} iters){ar}")
        return "\n".join(lines)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / "report.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


def nll_per_token(scores: list[tuple[float, bool]], requests) -> float:
    tokens = sum(len(continuation) for _, continuation in requests)
    return -sum(logprob for logprob, _ in scores) / max(tokens, 1)


def make_report(denoiser, tokenizer, prompts: list[str], examples, *, strategy: str | None = None, iters: int = ITERS,
                max_new_tokens: int = MAX_NEW_TOKENS, chat_template: bool | str = True, seed: int = 0,
                parent: bool = True, block_length: int | None = None) -> Report:
    """Answer `prompts` with the denoiser (`strategy`: default the run's own, as lad-generate reads it) and with
    the AR parent (greedy), and score `examples` (prompt_ids, answer_ids) under both. `parent=False` (a
    from-scratch base, a full fine-tune) leaves the AR side out."""
    from .generate import ar_generate, generate
    from .sampling import default_strategy
    from .scoring.ar import score_ar
    from .scoring.denoise import score_denoise

    strategy = strategy or default_strategy(denoiser)

    answers = []
    if prompts:
        blocks = {"block_length": block_length} if block_length else {}
        lad = generate(denoiser, prompts, strategy=strategy, tokenizer=tokenizer, iters=iters,
                       max_new_tokens=max_new_tokens, seed=seed, chat_template=chat_template, **blocks)
        ar = (ar_generate(denoiser, tokenizer, prompts, chat_template=chat_template, max_new_tokens=max_new_tokens,
                          seed=seed) if parent else [None] * len(prompts))
        answers = [{"prompt": p, "lad": a.text, "ar": b.text if b else None, "lad_seconds": a.seconds,
                    "ar_seconds": b.seconds if b else None} for p, a, b in zip(prompts, lad, ar)]
    requests = [(e.prompt_ids, e.answer_ids) for e in examples if e.prompt_ids and e.answer_ids]
    lad_nll = ar_nll = None
    if requests:
        lad_nll = nll_per_token(score_denoise(denoiser, requests, iters=iters), requests)
        ar_nll = nll_per_token(score_ar(denoiser, requests), requests) if parent else None
    return Report(strategy=strategy, iters=iters, answers=answers, scored_examples=len(requests),
                  lad_nll_per_token=lad_nll, ar_nll_per_token=ar_nll)
