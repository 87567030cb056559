"""Peak memory and time of the parent-KL term: autograd on the plain formula vs LAD's chunked KL.

    python -m eval.bench_kl_memory              # 1,000 positions × SmolLM2's 49,152-token vocabulary

Each variant runs in its own process (peak RSS is per process), value and backward, and prints the peak
memory it added over its inputs and the seconds it took, then the ratios.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

N, V = 1000, 49152


def measure(kind: str) -> dict:
    import torch
    import torch.nn.functional as F

    from lad.loss import kl_to_parent

    torch.manual_seed(0)
    logits = torch.randn(N, V, requires_grad=True)
    parent, weights = torch.randn(N, V), torch.rand(N)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if kind == "plain":
        log_q, log_p = F.log_softmax(logits, -1), F.log_softmax(parent, -1)
        loss = ((log_p.exp() * (log_p - log_q)).sum(-1) * weights).sum()
    else:
        loss = kl_to_parent(logits, parent, weights)
    loss.backward()
    return {"kind": kind, "seconds": time.perf_counter() - started,
            "peak_added_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2])))
        return 0
    runs = {k: json.loads(subprocess.check_output([sys.executable, __file__, "--child", k], text=True).splitlines()[-1])
            for k in ("plain", "chunked")}
    for r in runs.values():
        print(f"{r['kind']:>8}: +{r['peak_added_mb']:.0f} MB peak, {r['seconds']:.2f} s")
    print(f"memory chunked/plain {runs['chunked']['peak_added_mb'] / runs['plain']['peak_added_mb']:.2f}×, "
          f"time {runs['chunked']['seconds'] / runs['plain']['seconds']:.2f}× "
          f"({N} positions × {V} vocabulary; the gradient alone is {N * V * 4 / 2**20:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
