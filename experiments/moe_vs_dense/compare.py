"""Prints the tables of README.md from results/ (copies of the runs' summary.json):
the first 600-step comparison (results/*.json) and the ablations at one point of the scaling
comparison (results/ablations/*.json, written by ablations.sh; moe.json and dense.json there are
the sweep runs it starts from)."""

import json
import pathlib

here = pathlib.Path(__file__).parent


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


print("| model | params total | params active | tokens | training FLOPs | FLOPs/token | eval loss | eval bpb | tokens/s | wall |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ("dense", "dense_seed1", "moe", "moe_dropless"):
    s = load(here / "results" / f"{name}.json")
    print(f"| {name} | {s['params_total']:,} | {s['params_active']:,} | {s['tokens']:,} | {s['train_flops']:.3g} "
          f"| {s['train_flops'] / s['tokens']:,.0f} | {s['final_eval_loss']:.4f} | {s['final_eval_bpb']:.4f} "
          f"| {s['tokens_per_sec']:,.0f} | {s['wall_time_s']:.0f} s |")

ablations = here / "results" / "ablations"
if ablations.is_dir():
    reference = load(ablations / "moe.json")["final_eval_loss"]
    print()
    print("| run | eval loss (± stderr) | vs the MoE run | dropped assignments (late mean) | load-balance loss (late mean) |")
    print("|---|---|---|---|---|")
    order = ["dense", "dense_seed1", "moe", "moe_seed1"]
    names = order + sorted(p.stem for p in ablations.glob("*.json") if p.stem not in order)
    for name in names:
        path = ablations / f"{name}.json"
        if not path.exists():
            continue
        s = load(path)
        late = s.get("late_train_means", {})  # means over the second half of training
        dropped = late.get("moe/dropped_fraction")
        balance = late.get("moe/load_balance_loss")
        print(f"| {name} | {s['final_eval_loss']:.4f} ± {s['final_eval_loss_stderr']:.4f} | {s['final_eval_loss'] - reference:+.4f} "
              f"| {'' if dropped is None else f'{dropped:.2%}'} | {'' if balance is None else f'{balance:.3f}'} |")
