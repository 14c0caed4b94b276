#!/usr/bin/env bash
# One run of the plan (width/plan.json) trained again, seed 0, at two other learning rates; everything
# else is the plan's run. One core each, both at once, as run_seeds.py runs its pairs. Prints
# name,lr,loss,loss_stderr. A finished probe is not trained again (`lmjax train` on a finished run).
#
#     bash experiments/chinchilla_cpu/width/seeds/lr_probe.sh [RUN LR1 LR2]
#
# Default: the fit's largest residual (8e12, N=93,080: its seeds' mean 4.5% above the law at the power
# law's rate 0.0075) at the 2e12 grid's best rate for its size (0.016) and between the two (0.0113).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
run=${1:-C8e12_N93080}
rates=("${2:-0.016}" "${3:-0.0113}")
mkdir -p runs/lr_probe
base=runs/chinchilla_cpu_width_seeds/base.yaml  # width/plan.json's base config, as run_seeds.py writes it
[ -f "$base" ] || .venv/bin/python -c "
import json; from lmjax.config import Config, save_config; from lmjax.config_tree import build
save_config(build(Config, json.load(open('experiments/chinchilla_cpu/width/plan.json'))['base_config']), '$base')"
# The plan entry's overrides but its run_dir and rate (the rates are the point of the probe).
# (An assignment, so that set -e stops the script when the run is not in the plan.)
line=$(.venv/bin/python -c "
import json, sys; plan = json.load(open('experiments/chinchilla_cpu/width/plan.json'))
entry = next((e for e in plan['runs'] if e['name'] == '$run'), None)
if entry is None:
    sys.exit('$run: no such run in experiments/chinchilla_cpu/width/plan.json')
print(' '.join(o for o in entry['overrides'] if not o.startswith(('run_dir=', 'optim.lr='))))")
read -r -a overrides <<< "$line"
core=0
for lr in "${rates[@]}"; do
    OMP_NUM_THREADS=1 taskset -c $core .venv/bin/python -m lmjax.cli train "$base" "${overrides[@]}" "optim.lr=$lr" seed=0 \
        logging.progress=false "run_dir=runs/lr_probe/${run}_lr$lr" > "runs/lr_probe/${run}_lr$lr.log" 2>&1 &
    core=$(((core + 1) % $(nproc)))
done
wait
echo "name,lr,loss,loss_stderr"
for lr in "${rates[@]}"; do
    .venv/bin/python -c "
import json; s = json.load(open('runs/lr_probe/${run}_lr$lr/summary.json'))
print(f\"${run}_lr$lr,$lr,{s['final_eval_loss']},{s['final_eval_loss_stderr']}\")"
done
