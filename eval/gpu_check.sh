#!/usr/bin/env bash
# The GPU checks, as one prepared run on a lent CUDA machine with no network (eval/gpu_check.py says why random
# weights). From the repository root:
#   bash eval/gpu_check.sh OUT_DIR [SHAPE] [DEADLINE_S]
# SHAPE: llama3-8b (default) or tiny (a dry run of the plumbing on any machine). Needs .gpu/tokenizer (any
# LLaMA-family tokenizer folder; we use SmolLM2's), .gpu/data/{alpaca,gsm8k}.jsonl (../shared/data/train/), and
# where the machine lacks them .gpu/whl/*.whl (pip-installed) and .gpu/site (unpacked packages). Steps run in
# order of importance, each under a timeout cut to what is left of DEADLINE_S; OUT_DIR gets env.json,
# attention.json, base.json, runs.json, sampling.json and log.txt, whatever finishes.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [SHAPE] [DEADLINE_S]}
SHAPE=${2:-llama3-8b}
DEADLINE=$(( $(date +%s) + ${3:-560} ))
STEPS=${STEPS:-4}
if [ -z "${RUNS:-}" ]; then  # the 16 GB random base is written once and read twice: RAM-backed where it fits
  RUNS=/tmp/lad_gpu_runs
  free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
  [ "${free_kb:-0}" -gt 50000000 ] && RUNS=/dev/shm/lad_gpu_runs
fi
BASE=$RUNS/base_$SHAPE
mkdir -p "$OUT" "$RUNS"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lad_site \
    .gpu/whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
fi
export PYTHONPATH=$PWD:/tmp/lad_site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME MAX_SECONDS COMMAND...: run under min(MAX, time left); log its output and how it ended
  local name=$1 max=$2 left=$(( DEADLINE - $(date +%s) - 5 ))
  shift 2
  (( left < max )) && max=$left
  if (( max < 15 )); then echo "== $name: skipped, no time left" >>"$LOG"; return 1; fi
  echo "== $name (timeout ${max}s): $*" >>"$LOG"
  local t0=$(date +%s)
  timeout "$max" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" >>"$LOG"
  return $rc
}

json() {  # json NAME MAX ARGS...: a gpu_check subcommand whose JSON goes to OUT/NAME.json
  local name=$1 max=$2
  shift 2
  step "$name" "$max" python3 -m eval.gpu_check "$@" --json-out "$OUT/$name.json"
}

nvidia-smi >>"$LOG" 2>&1
LAUNCH=(python3 -m accelerate.commands.launch)  # `accelerate launch`, whether or not its script is on PATH
json env 60 env
json attention 90 attention
json base 200 make-base --shape "$SHAPE" --tokenizer .gpu/tokenizer --out "$BASE"
DATA=(data.train.0.path=.gpu/data/alpaca.jsonl data.train.1.path=.gpu/data/gsm8k.jsonl max_steps=$STEPS
      "report_to=[]" overwrite=true model.name_or_path=$BASE)
[ "$SHAPE" = tiny ] && DATA+=(data.max_length=256 data.val_max_examples=8)
step lora 200 "${LAUNCH[@]}" --num_processes 1 lad/finetune.py recipes/llama8b_lora.yaml "${DATA[@]}" \
  output_dir=$RUNS/lora
step qlora 220 "${LAUNCH[@]}" --num_processes 1 lad/finetune.py recipes/llama8b_qlora.yaml "${DATA[@]}" \
  output_dir=$RUNS/qlora
step sampling 150 python3 -m eval.bench_sampling --model "$RUNS/lora" --prompts 2 --max-new-tokens 128 --iters 64 \
  --block-length 32 --repeats 1 --no-quality --strategies confidence threshold --out "$OUT/sampling.json"
step fsdp 90 "${LAUNCH[@]}" --config_file recipes/accelerate/fsdp.yaml --num_processes 1 lad/finetune.py \
  recipes/tiny.yaml max_steps=4 "report_to=[]" overwrite=true output_dir=$RUNS/fsdp
json runs 30 summarise "$RUNS/lora" "$RUNS/qlora" "$RUNS/fsdp"
echo "== done" >>"$LOG"
