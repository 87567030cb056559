"""Is the LAD model really below (or above) its parent? Paired intervals over the documents both scored.

Per-model ± stderr cannot say whether two models differ on the same documents: their errors are correlated (both
find the same documents hard). The paired view looks at each document's difference, LAD minus parent:

- `paired_interval`: the mean difference and its 95% interval by the paired bootstrap (documents resampled with
  replacement, the percentile interval; a fixed seed, so a table is reproducible);
- `mcnemar_p`: for 0/1 metrics (acc, acc_norm), McNemar's exact two-sided p-value from the discordant documents
  (right for one model only, and for the other only), the binomial test at 1/2.

`paired_rows` reads both models' per-document results from lm-eval's logged samples (matched by task and doc_id)
and gives every task, and every group pooled over its tasks, both statistics; `lad-eval --compare` prints them.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("acc", "acc_norm")


def paired_interval(a, b, level: float = 0.95, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high): the paired bootstrap's percentile interval at `level`."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.ndim != 1 or not len(diff):
        raise ValueError("paired_interval needs two equally long, non-empty lists of per-document values")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(low), float(high)


def mcnemar_p(a, b) -> float:
    """McNemar's exact two-sided p-value for paired 0/1 outcomes: of the n discordant documents, k went one way;
    p = min(1, 2 · P(Binomial(n, 1/2) <= min(k, n - k)))."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    if not n:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def per_document(samples: dict) -> dict[str, dict[str, dict[int, float]]]:
    """{task: {metric: {doc_id: value}}} from lm-eval's logged samples (`results["samples"]`)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for task, rows in (samples or {}).items():
        for row in rows:
            for metric in METRICS:
                if metric in row:
                    out.setdefault(task, {}).setdefault(metric, {})[int(row["doc_id"])] = float(row[metric])
    return out


def paired_rows(lad: dict, parent: dict) -> dict[tuple[str, str], dict]:
    """{(task or group, metric): {"n", "delta", "low", "high", "p"}} for every task both results logged samples
    for (documents matched by id; a group pools its tasks' documents)."""
    mine, theirs = per_document(lad.get("samples")), per_document(parent.get("samples"))
    pairs: dict[tuple[str, str], tuple[list, list]] = {}
    for task in mine.keys() & theirs.keys():
        for metric in mine[task].keys() & theirs[task].keys():
            docs = sorted(mine[task][metric].keys() & theirs[task][metric].keys())
            pairs[(task, metric)] = ([mine[task][metric][d] for d in docs], [theirs[task][metric][d] for d in docs])
    for group, members in (lad.get("group_subtasks") or {}).items():
        for metric in METRICS:
            parts = [pairs[(m, metric)] for m in members if (m, metric) in pairs]
            if parts:
                pairs[(group, metric)] = ([x for a, _ in parts for x in a], [x for _, b in parts for x in b])
    out = {}
    for key, (a, b) in pairs.items():
        if a:
            delta, low, high = paired_interval(a, b)
            out[key] = {"n": len(a), "delta": delta, "low": low, "high": high, "p": mcnemar_p(a, b)}
    return out


def interval_cell(row: dict | None, documents: bool = True) -> str:
    """"+0.0120 [-0.0100, +0.0340] p=0.31 (n=500)" (without "(n=…)" when not `documents`: a table that gives the
    count in a column of its own), or "-" without per-document results."""
    if row is None:
        return "-"
    cell = f"{row['delta']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}] p={row['p']:.2g}"
    return f"{cell} (n={row['n']})" if documents else cell
