#!/usr/bin/env bash
# Time the README quickstart's first command as a new user runs it: a fresh clone of this repository's HEAD,
# a fresh virtual environment and a fresh LAD cache (so the GGUF dequantisation and the self-distillation are
# included). Run it on an otherwise idle machine; it prints QUICKSTART_SECONDS=N at the end.
#   bash eval/time_quickstart.sh [CLONE_DIR]        # default: a new temporary folder
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-$(mktemp -d)/lad}
[ -e "$target" ] && { echo "time_quickstart: $target exists; give a new folder" >&2; exit 2; }
git clone -q "$repo" "$target" && cd "$target"
python3 -m venv .venv && . .venv/bin/activate
export LAD_CACHE="$target/.lad-cache"
first=$(sed -n '/^## Quickstart/,/^```$/{/^```bash/,/^```$/p}' README.md | sed -n 2p)
echo "first command: $first"
start=$(date +%s)
echo "started at $(date +%T) (the run's log lines carry the same clock: the phases are read from them)"
bash -c "$first"
echo "QUICKSTART_SECONDS=$(( $(date +%s) - start ))"
