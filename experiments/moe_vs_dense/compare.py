"""Prints the MoE-vs-dense table of README.md from results/{dense,moe}.json (copies of the runs' summary.json)."""

import json
import pathlib

here = pathlib.Path(__file__).parent
print("| model | params total | params active | tokens | training FLOPs | FLOPs/token | eval loss | eval bpb | tokens/s | wall |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ("dense", "dense_seed1", "moe", "moe_dropless"):
    s = json.loads((here / "results" / f"{name}.json").read_text())
    print(f"| {name} | {s['params_total']:,} | {s['params_active']:,} | {s['tokens']:,} | {s['train_flops']:.3g} "
          f"| {s['train_flops'] / s['tokens']:,.0f} | {s['final_eval_loss']:.4f} | {s['final_eval_bpb']:.4f} "
          f"| {s['tokens_per_sec']:,.0f} | {s['wall_time_s']:.0f} s |")
