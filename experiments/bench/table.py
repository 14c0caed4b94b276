"""Prints the markdown table of experiments/bench/results/*.json (the numbers in README.md)."""

import json
import pathlib

rows = []
for path in sorted(pathlib.Path(__file__).parent.glob("results/*.json")):
    r = json.loads(path.read_text())
    model = r["config"]["model"]
    rows.append(
        f"| {path.stem} | {model['n_layers']} x {model['d_model']}, scan={str(model['scan_layers']).lower()} "
        f"| {r['params_non_embedding'] / 1e6:.2f}M | {r['step_time_s'] * 1e3:,.0f} ms "
        f"({r['step_time_p10_s'] * 1e3:,.0f}-{r['step_time_p90_s'] * 1e3:,.0f}) | {r['tokens_per_sec']:,.0f} "
        f"| {r['tflops_per_sec'] * 1e3:.1f} | {r['mfu']:.1%} | {r['compile_time_s']:.1f} s | {r['time_to_first_step_s']:.1f} s "
        f"| {r['peak_memory_bytes'] / 2**20:,.0f} MiB | {r['data_batches_per_sec']:,.0f} ({r['data_headroom']:,.0f}x) | {r['device']} |"
    )
print("| result | layers x width | non-emb params | step (p10-p90) | tokens/s | GFLOP/s | MFU | compile | first step | peak RSS | pipeline batches/s (x step rate) | device |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
