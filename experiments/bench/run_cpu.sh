#!/usr/bin/env bash
# The CPU benchmarks recorded in README.md. Run from the repo root on an otherwise idle machine:
#   bash experiments/bench/run_cpu.sh
set -euo pipefail
out=experiments/bench/results
mkdir -p "$out"
lmjax=${LMJAX:-.venv/bin/lmjax}
"$lmjax" bench configs/dense_tiny.yaml logging.wandb=off --steps 20 --out "$out/dense_tiny_cpu.json"
"$lmjax" bench configs/bench_cpu.yaml logging.wandb=off --steps 10 --out "$out/bench_cpu.json"
# The MoE-vs-dense pair of experiments/moe_vs_dense (dense_tiny above is its dense side).
"$lmjax" bench configs/moe_tiny.yaml logging.wandb=off --steps 20 --out "$out/moe_tiny_cpu.json"
"$lmjax" bench configs/moe_tiny.yaml logging.wandb=off model.moe.dispatch=dropless --steps 20 --out "$out/moe_tiny_dropless_cpu.json"
# Ablation: full rematerialisation (recompute every block in the backward pass).
"$lmjax" bench configs/bench_cpu.yaml logging.wandb=off model.remat=full --steps 10 --out "$out/bench_cpu_remat_full.json"
# Compile time against depth: scanned layers stay flat, an unrolled Python loop grows.
for layers in 4 32; do
  for scan in true false; do
    "$lmjax" bench configs/dense_tiny.yaml logging.wandb=off model.n_layers=$layers model.scan_layers=$scan \
      --steps 2 --warmup 0 --out "$out/compile_L${layers}_scan_${scan}.json"
  done
done
# The encoder-only masked LM (experiments/mlm_cpu), beside dense_tiny above.
"$lmjax" bench configs/bert_tiny.yaml logging.wandb=off --steps 20 --out "$out/bert_tiny_cpu.json"
# The encoder-decoder (experiments/t5_cpu): 128 encoder + 29 decoder tokens per row.
"$lmjax" bench configs/t5_tiny.yaml logging.wandb=off --steps 20 --out "$out/t5_tiny_cpu.json"
