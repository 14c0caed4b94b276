#!/usr/bin/env bash
# MoE (8 experts, top-2, expert width 192) vs the dense model with the same active parameters
# (dense_tiny: SwiGLU width 384 = 2 x 192), same data, same tokens (600 steps x 2,048 tokens).
# Run from the repo root: bash experiments/moe_vs_dense/run.sh
set -euo pipefail
lmjax=${LMJAX:-.venv/bin/lmjax}
common=(train.steps=600 train.eval_every=200 train.eval_batches=16 train.checkpoint_every=600 optim.warmup_steps=30 logging.wandb=off)
"$lmjax" train configs/dense_tiny.yaml run_dir=runs/moe_vs_dense/dense "${common[@]}"
"$lmjax" train configs/moe_tiny.yaml run_dir=runs/moe_vs_dense/moe "${common[@]}"
# The same MoE without token dropping: sorted tokens and grouped matmuls (jax.lax.ragged_dot).
"$lmjax" train configs/moe_tiny.yaml run_dir=runs/moe_vs_dense/moe_dropless model.moe.dispatch=dropless "${common[@]}"
# The noise floor: the dense run again with another seed (initialisation and data order).
"$lmjax" train configs/dense_tiny.yaml run_dir=runs/moe_vs_dense/dense_seed1 seed=1 "${common[@]}"
mkdir -p experiments/moe_vs_dense/results
for name in dense moe moe_dropless dense_seed1; do cp runs/moe_vs_dense/$name/summary.json experiments/moe_vs_dense/results/$name.json; done
