"""Loss against learning rate at four widths, SP and μP: does the optimum stay put (μP paper, figure 1)?

Run from the repo root: `.venv/bin/python experiments/mup_transfer/run.py` (reruns skip finished
runs and resume interrupted ones), then `.venv/bin/python experiments/mup_transfer/plot.py`.
Every run is an ordinary `lmjax train` run directory under runs/mup_transfer/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs" / "mup_transfer"
WIDTHS = (32, 64, 128, 256)  # 8x; heads of 16 dimensions, 2 layers
BASE_WIDTH = 32  # μP's base: its runs are SP's exactly
LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
COMMON = [
    "model.vocab_size=1024", "model.n_layers=2", "model.head_dim=16", "model.n_kv_heads=null",
    "data.seq_len=64", "data.global_batch_size=16",  # 1,024 tokens per step
    "train.steps=300", "optim.warmup_steps=30", "optim.schedule=cosine",
    "train.eval_every=0", "train.final_eval_tokens=1000000",  # the whole validation split (~122k tokens)
    "train.log_every=50", "train.checkpoint_every=300", "logging.wandb=off", "logging.progress=false",
]


def run_name(parameterization: str, width: int, lr: float) -> str:
    return f"{parameterization}_w{width}_lr{lr:g}"


def overrides(parameterization: str, width: int, lr: float) -> list[str]:
    d_ff = 32 * round(8 / 3 * width / 32)  # SwiGLU at 8/3 d, a multiple of 32
    return [*COMMON, f"run_dir={RUNS / run_name(parameterization, width, lr)}", f"model.d_model={width}",
            f"model.n_heads={width // 16}", f"model.d_ff={d_ff}", f"optim.lr={lr}",
            f"model.parameterization={parameterization}", f"model.mup_base_width={BASE_WIDTH}"]


def main() -> int:
    todo = [(p, w, lr) for w in WIDTHS for p in ("mup", "sp") for lr in LRS]
    for i, (parameterization, width, lr) in enumerate(todo, 1):
        summary = RUNS / run_name(parameterization, width, lr) / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
            continue
        start = time.perf_counter()
        command = [sys.executable, "-m", "lmjax.cli", "train", str(ROOT / "configs" / "dense_tiny.yaml"),
                   *overrides(parameterization, width, lr)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        last = (result.stdout.strip().splitlines() or [""])[-1] if result.returncode == 0 else result.stderr.strip()[-300:]
        print(f"[{i}/{len(todo)}] {run_name(parameterization, width, lr)}: exit {result.returncode} "
              f"in {time.perf_counter() - start:.0f}s: {last}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
