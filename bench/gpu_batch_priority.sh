#!/bin/bash
# bench/batch_priority.py on the lent nvidia-h200-x2 (after bench/gpu_setup.sh): vLLM with SmolLM2's real
# weights (MODEL=llama-8b-shape: dummy weights, SmolLM2's tokenizer), variants of the fleet two at a time,
# one per GPU, each GPU with its own compile caches.
#   bash bench/gpu_batch_priority.sh 'ARGS OF RUN 1' 'ARGS OF RUN 2' ... -- 'ARGS' ...
# The runs before `--` go to GPU 0 one after the other, those after it to GPU 1. Each run's ARGS start
# with its label. Results: $OUT/batch/<label>.json and .log; the workers' profiles under $OUT/batch/profiles.
set -uo pipefail
out=${OUT:-bench/out}/batch
model=${MODEL:-smollm2-135m}
weights=(--real-weights)
[ "$model" = smollm2-135m ] || weights=(--tokenizer /tmp/models/smollm2-135m)
mkdir -p "$out"
gpu0=(); gpu1=(); target=gpu0
for run in "$@"; do
  if [ "$run" = "--" ]; then target=gpu1; continue; fi
  if [ $target = gpu0 ]; then gpu0+=("$run"); else gpu1+=("$run"); fi
done
runs() {  # GPU, then its runs
  local gpu=$1; shift
  for run in "$@"; do
    read -r label args <<< "$run"
    HOME=/tmp/home-gpu$gpu TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-gpu$gpu CUDA_VISIBLE_DEVICES=$gpu \
      python bench/batch_priority.py --vllm "/tmp/models/$model" "${weights[@]}" --max-seqs 256 \
        --lines 8000 --probes 100 --clients 512 --fleet-log "$out/$label.fleet.log" \
        --out "$out/$label.json" $args > "$out/$label.log" 2>&1
    echo "[gpu$gpu] $label: exit $?"; grep -h "^|" "$out/$label.log"
  done
}
runs 0 "${gpu0[@]}" &
runs 1 "${gpu1[@]}" &
wait
