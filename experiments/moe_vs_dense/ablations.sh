#!/usr/bin/env bash
# What moves the MoE's loss at one point of the scaling comparison: C = 1e12 FLOPs, 52,752 active
# parameters (8 experts top-2, 48 x 1 shape, 1,947 steps x 1,024 tokens), against the dense run
# of the same active size and budget. point/{moe,dense}.yaml are the resolved configs of the sweep
# runs runs/moe_vs_dense/{moe/runs/C1e12_N108048,dense/runs/C1e12_N52368}; each ablation changes
# one key. Run from the repo root (~15 min on 2 CPU cores):
#   bash experiments/moe_vs_dense/ablations.sh && python experiments/moe_vs_dense/compare.py
set -euo pipefail
lmjax=${LMJAX:-.venv/bin/lmjax}
here=experiments/moe_vs_dense
out=runs/moe_vs_dense/ablations
run() {  # name config overrides...
  local name=$1 config=$2; shift 2
  "$lmjax" train "$here/point/$config.yaml" run_dir="$out/$name" logging.wandb=off "$@"
  keep "$out/$name" "$name"
}
keep() {  # run_dir name: its summary.json plus the MoE drop and balance stats, averaged over the second half of training
  mkdir -p "$here/results/ablations"
  "${PYTHON:-.venv/bin/python}" - "$1" "$here/results/ablations/$2.json" <<'PY'
import json, sys
run, out = sys.argv[1:]
summary = json.load(open(f"{run}/summary.json"))
lines = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
train = [m for m in lines if "loss" in m]
late = train[len(train) // 2:]
summary["late_train_means"] = {key: sum(m[key] for m in late) / len(late)
                               for key in ("moe/dropped_fraction", "moe/load_balance_loss") if key in late[-1]}
open(out, "w").write(json.dumps(summary, indent=1) + "\n")
PY
}
keep runs/moe_vs_dense/moe/runs/C1e12_N108048 moe        # the two sweep runs the ablations start from
keep runs/moe_vs_dense/dense/runs/C1e12_N52368 dense
run dense_seed1 dense seed=1                                   # the noise: another init and data order
run moe_seed1 moe seed=1
run moe_capacity moe model.moe.dispatch=capacity               # factor 1.25, capacity per 128-token group
run moe_no_balance moe model.moe.load_balance_loss=0.0
run moe_balance_0.1 moe model.moe.load_balance_loss=0.1
run moe_router_lr_0.1 moe model.moe.router_lr_scale=0.1
run moe_router_lr_10 moe model.moe.router_lr_scale=10.0
