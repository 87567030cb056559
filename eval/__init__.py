"""LAD benchmarks and evaluation scripts: `python -m eval.bench` runs the benchmarks (see eval/bench.py)."""
