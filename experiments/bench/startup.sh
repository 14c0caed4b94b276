#!/usr/bin/env bash
# Time to first step of `lmjax train configs/dense_tiny.yaml` (issue 15 item 4): from the process's
# start to the first step's loss on the host (`time_to_first_step_s` in summary.json), imports
# included. Cold: empty tokenizer, tokenized-corpus and compilation caches (the CPU peak stays
# cached in ~/.cache/lmjax). Warm: the same command again with those caches filled.
# Run from the repo root on an idle machine: bash experiments/bench/startup.sh [runs per case, default 2]
set -euo pipefail
lmjax=${LMJAX:-.venv/bin/lmjax}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
first_step() { .venv/bin/python -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['time_to_first_step_s']:.1f}\")" "$1/summary.json"; }
for i in $(seq "${1:-2}"); do
  caches=$tmp/caches$i
  for case in cold warm; do
    run=$tmp/run_${case}_$i
    LMJAX_COMPILATION_CACHE=$caches/jax "$lmjax" train configs/dense_tiny.yaml run_dir="$run" data.cache_dir="$caches/data" \
      train.steps=1 logging.wandb=off logging.progress=false > "$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
    echo "$case: first step after $(first_step "$run") s"
  done
done
