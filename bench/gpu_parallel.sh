#!/bin/bash
# bench/vllm_vs_fleet.py with both sides at once, each on a GPU of its own (nvidia-h200-x2): the same
# machine at the same time for both, in half the device time. Each side gets its own compile caches
# (two servers compiling the same graphs into one cache at once could trip over each other).
#   bash bench/gpu_parallel.sh MODEL [args for both sides] [-- args for a second fleet run on GPU 0]
# The second fleet run (a variant, e.g. --kv-oversubscription 1.5 --label kv1.5) follows vllm serve on
# GPU 0. Results, logs and the combined table go to $OUT/MODEL (default bench/out/MODEL).
set -uo pipefail
model=$1; shift
both=(); variant=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; variant=("$@"); break; fi
  both+=("$1"); shift
done
out=${OUT:-bench/out}/$model
mkdir -p "$out"
side() {  # GPU, then the arguments of one bench run
  local gpu=$1; shift
  HOME=/tmp/home-gpu$gpu TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-gpu$gpu CUDA_VISIBLE_DEVICES=$gpu \
    python bench/vllm_vs_fleet.py --model "$model" --out "$out" "${both[@]}" "$@"
}
( side 0 --only vllm-serve > "$out/vllm-serve.log" 2>&1
  if [ ${#variant[@]} -gt 0 ]; then side 0 --only llm-fleet --fleet-port 8300 "${variant[@]}" > "$out/fleet-variant.log" 2>&1; fi ) &
side 1 --only llm-fleet > "$out/fleet.log" 2>&1 &
wait
grep -h "^\[bench" "$out"/*.log | cut -c1-400
python bench/vllm_vs_fleet.py --model "$model" --table "$out"/"$model"-*.json
