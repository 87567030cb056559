"""Acceptance rules of speculative decoding: which drafted tokens the parent keeps, and the token it adds.

Greedy (temperature 0): a drafted token is kept while it is the parent's own argmax; the first disagreement is
replaced by the parent's token, and a fully kept draft gets the parent's next token as a bonus. The result is token
for token the parent's greedy output.

Sampling (temperature > 0; Leviathan et al. 2023, Chen et al. 2023): drafted token x, drawn from the draft's
distribution q, is kept with probability min(1, p(x) / q(x)) where p is the parent's (both filtered by the same
temperature, top-k and top-p); at the first rejection a token is drawn from max(p - q, 0) normalised, after a fully
kept draft from p. Every emitted token is then distributed exactly as the parent's own sampling would draw it.

Each row of a batch is judged on its own (lad/sampling/speculative.py lets rows advance by different amounts), so a
row's tokens and its generator's draws do not depend on the rest of its batch. Both rules return (kept [B], tokens
[B, d + 1]): row b's new text is tokens[b, :kept[b] + 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import filter_logits


def greedy_round(draft: Tensor, valid: Tensor, parent_logits: Tensor) -> tuple[Tensor, Tensor]:
    """`draft` [B, d] (`valid` [B, d]: the row's own draft columns) checked against `parent_logits` [B, d + 1, V]
    (column i predicts the token after the i-th checked column: the last accepted one, then each draft token)."""
    choice = parent_logits.argmax(-1)  # [B, d + 1]: the parent's own tokens, which the kept drafts equal
    return leading_true((draft == choice[:, :-1]) & valid), choice


def sampled_round(draft: Tensor, valid: Tensor, draft_probs: Tensor | None, parent_logits: Tensor,
                  generators: list[torch.Generator], sampling: dict) -> tuple[Tensor, Tensor]:
    """As `greedy_round` with the speculative sampling rule; `draft_probs` [B, d, V]: the (filtered) distributions
    the draft tokens were drawn from (None when d is 0). Each row draws from its own generator: d uniforms when it
    has a draft, then one token."""
    rows, d = draft.shape
    p = filter_logits(parent_logits.float(), **sampling).softmax(-1)  # [B, d + 1, V]
    kept = torch.zeros(rows, dtype=torch.long, device=draft.device)
    if d:
        p_x = p[:, :d].gather(-1, draft[..., None])[..., 0]
        q_x = draft_probs.float().gather(-1, draft[..., None])[..., 0]
        u = torch.stack([torch.rand(d, generator=g, device=g.device) if bool(valid[b].any())
                         else torch.ones(d, device=g.device) for b, g in enumerate(generators)]).to(p.device)
        kept = leading_true((u * q_x <= p_x) & valid)
    tokens = draft.new_zeros(rows, d + 1)
    tokens[:, :d] = draft
    for row in range(rows):
        at = int(kept[row])
        target = p[row, at]
        if at < d and bool(valid[row, at]):  # rejected there: draw from what p has beyond q
            residual = (target - draft_probs[row, at].float()).clamp(min=0)
            target = residual if residual.sum() > 0 else target
        tokens[row, at] = torch.multinomial((target / target.sum()).to(generators[row].device), 1,
                                            generator=generators[row]).to(tokens.device)[0]
    return kept, tokens


def leading_true(agree: Tensor) -> Tensor:
    """[B] the number of leading True entries of each row of `agree` [B, d]."""
    return agree.long().cumprod(-1).sum(-1)
