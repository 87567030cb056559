"""Multiple-choice scoring: the log-likelihood of a continuation given a context, for lm-eval.

Every scorer takes `(denoiser, requests, *, ..., batch_size, progress, stats)`, where a request is
`(context_ids, continuation_ids)`, and returns `[(log-likelihood, is_greedy)]` in request order:

- `score_denoise`: reveal the continuation over `iters` iterations, most confident (or leftmost) first, summing
  the true tokens' log-probs as they are revealed; deterministic; exact any-order chain rule when iters >= L;
- `score_elbo`: LLaDA's Monte-Carlo ELBO, draws shared by the choices of one question (`group_ids`);
- `score_ar`: the AR parent (adapter off, causal attention), as lm-eval's `hf` model scores it.

`stats` (a dict, optional) collects the cost: "nfe" = sequences run through the model (independent of the batch
size), "forward_calls" = batched forwards.
"""

from .ar import score_ar
from .denoise import score_denoise
from .elbo import score_elbo

SCORERS = {"denoise": score_denoise, "elbo": score_elbo}

__all__ = ["SCORERS", "score_ar", "score_denoise", "score_elbo"]
