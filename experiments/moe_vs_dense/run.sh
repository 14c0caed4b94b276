#!/usr/bin/env bash
# MoE (8 experts, top-2, expert width 192) vs the dense model with the same active parameters
# (dense_tiny: SwiGLU width 384 = 2 x 192), same data, same tokens (600 steps x 2,048 tokens).
# Run from the repo root: bash experiments/moe_vs_dense/run.sh
set -euo pipefail
lmjax=${LMJAX:-.venv/bin/lmjax}
common=(train.steps=600 train.eval_every=200 train.eval_batches=16 train.checkpoint_every=600 optim.warmup_steps=30 logging.wandb=off)
"$lmjax" train configs/dense_tiny.yaml run_dir=runs/moe_vs_dense/dense "${common[@]}"
"$lmjax" train configs/moe_tiny.yaml run_dir=runs/moe_vs_dense/moe "${common[@]}"
mkdir -p experiments/moe_vs_dense/results
for name in dense moe; do cp runs/moe_vs_dense/$name/summary.json experiments/moe_vs_dense/results/$name.json; done
