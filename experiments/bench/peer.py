"""`lmjax bench` beside its PyTorch peer (experiments/bench/torch_reference.py), in one session.

    .venv/bin/python experiments/bench/peer.py --style llama --pairs 4 --steps 10
    .venv/bin/python experiments/bench/peer.py --style gpt2 --seq-len 512 --batch 8

Runs `--pairs` pairs, each side in its own subprocess so neither inherits the other's threads,
allocator or caches. The peer gets the malloc the `lmjax` command restarts itself with (jemalloc
where the system has it, `lmjax.host_memory`), so that neither side gains from its allocator alone;
`--peer-malloc system` runs it on python's own. The order inside a pair alternates (lmjax first, then the peer first, ...),
so a slow drift of the machine's load weighs on both sides alike. The peer's every option comes
from the same resolved lmjax config (CONFIG + overrides) that `lmjax bench` runs, so the two
shapes cannot disagree; a config the peer does not implement is an error, and so is a
parameter count that differs between the two reports.

gpt2 style runs at model.d_ff=1536: its 2-matrix GELU MLP then has the parameters of the llama
style's 3-matrix SwiGLU at 1024 (the issue's comparison). Prints per-pair numbers and the median
over pairs of lmjax / peer tokens/s and peak RSS; writes everything to `--out` (default
experiments/bench/results/peer/STYLE_SEQxBATCH.json: a subfolder, as table.py reads results/*.json
as lmjax bench results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmjax.config import Config, load_config
from lmjax.host_memory import find_jemalloc, restart_environment

ROOT = Path(__file__).resolve().parents[2]
PEER = Path(__file__).resolve().parent / "torch_reference.py"
# Keys copied from each side's report into the pair records (lmjax's also holds its whole config,
# kept once at the top of the output instead).
KEPT = ("tokens_per_sec", "step_time_s", "step_time_p10_s", "step_time_p90_s", "compile_time_s", "time_to_first_step_s",
        "peak_memory_bytes", "peak_memory_source", "params_total", "params_non_embedding", "tokens_per_step", "final_loss",
        "mfu", "tflops_per_sec", "model_flops_per_token", "peak_flops_per_device", "peak_flops_source", "device",
        "optimizer", "threads", "torch_version", "jax_version", "xla_flags", "malloc")


class PeerError(Exception):
    """A config the peer does not implement, a failed run, or sides that disagree."""


def lmjax_overrides(style: str, seq_len: int, batch: int, extra: list[str]) -> list[str]:
    overrides = ["logging.wandb=off", f"data.seq_len={seq_len}", f"data.global_batch_size={batch}"]
    if style == "gpt2":
        overrides += ["model.style=gpt2", "model.d_ff=1536"]
    return overrides + list(extra)


def peer_cli_args(cfg: Config) -> list[str]:
    """torch_reference.py options for the model, shape and optimizer of `cfg`. Raises PeerError
    for anything the peer does not implement (it would otherwise be a different model)."""
    m, o = cfg.model, cfg.optim
    llama = m.style == "llama"
    checks = {
        "model.family is dense": m.family == "dense",
        "model.style is llama or gpt2": m.style in ("llama", "gpt2"),
        "positions are the style's (rope / learned)": m.position_kind == ("rope" if llama else "learned"),
        "feed_forward is the style's (swiglu / gelu)": m.ffn == ("swiglu" if llama else "gelu"),
        "pre-norm blocks": not m.post_norm,
        "tie_embeddings": m.tie_embeddings,
        "float32 dtype and param_dtype": m.dtype == m.param_dtype == "float32",
        "standard parameterization": m.parameterization == "sp",
        "head_dim = d_model / n_heads": m.head_size * m.n_heads == m.d_model,
        "no sliding_window": m.sliding_window is None,
        "no rope_scaling": m.rope_scaling.kind == "none",
        "cosine schedule": o.schedule == "cosine",
        "no decay_embeddings": not o.decay_embeddings,
        "no z_loss": cfg.train.z_loss == 0,
        "one microbatch": cfg.train.microbatches == 1,
        "causal_lm objective": cfg.train.objective == "causal_lm",
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise PeerError(f"the torch peer does not implement this config: expected {'; '.join(failed)}")
    values = {
        "style": m.style, "d-model": m.d_model, "layers": m.n_layers, "heads": m.n_heads, "kv-heads": m.kv_heads,
        "d-ff": m.d_ff, "vocab": m.vocab_size, "max-seq-len": m.max_seq_len, "norm-eps": m.norm_eps,
        "rope-theta": m.rope_theta, "init-std": m.init_std, "seq-len": cfg.data.seq_len,
        "batch": cfg.data.global_batch_size, "lr": o.lr, "lr-warmup": o.warmup_steps, "schedule-steps": cfg.train.steps,
        "min-lr-ratio": o.min_lr_ratio, "b1": o.b1, "b2": o.b2, "eps": o.eps, "weight-decay": o.weight_decay,
        "grad-clip": o.grad_clip, "seed": cfg.seed,
    }
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def peer_malloc_environment(choice: str) -> dict[str, str]:
    """The variables the peer's process gets on top of this one's: with `lmjax`, the allocator the
    `lmjax` command restarts itself with (jemalloc where the system has it, else glibc's huge
    pages: lmjax.host_memory), so that neither side gains from its allocator alone; with `system`,
    none (the malloc `python` starts with)."""
    if choice == "system":
        return {}
    env = restart_environment(os.environ, sys.platform, find_jemalloc) or {}
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def run_side(name: str, cmd: list[str], out: Path, env: dict[str, str] | None = None) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise PeerError(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    # Each side's one-line summary is its last line naming tokens/s (lmjax may print notes after it).
    lines = [line for line in proc.stdout.splitlines() if "tokens/s" in line] or proc.stdout.strip().splitlines() or [""]
    print(f"  {name:5s} ({time.perf_counter() - t:.0f}s) {lines[-1]}", flush=True)
    return json.loads(out.read_text())


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(folder: Path) -> str:
    """The README's markdown table of every peer result (*.json) in `folder`."""
    lines = ["| result | style | seq x batch | attention | lmjax tokens/s | peer tokens/s | ratio (median) | lmjax MFU | peer MFU "
             "| lmjax peak RSS | peer peak RSS | ratio (median) | pairs | measured |", "|---" * 14 + "|"]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        mfu = lambda side: statistics.median(pair[side]["mfu"] for pair in r["pairs"])  # noqa: E731
        model = (r.get("lmjax_config") or {}).get("model", {})
        extra = f", CE chunks of {model['loss_chunk_tokens']}" if model.get("loss_chunk_tokens") else ""
        lines.append(
            f"| {path.stem} | {r['style']} | {r['seq_len']} x {r['batch']} | {model.get('attention', '?')}{extra} "
            f"| {r['lmjax_median_tokens_per_sec']:,.0f} | {r['peer_median_tokens_per_sec']:,.0f} | {r['median_tokens_per_sec_ratio']:.2f} "
            f"| {mfu('lmjax'):.1%} | {mfu('peer'):.1%} | {r['lmjax_median_peak_memory_bytes'] / 2**20:,.0f} MiB "
            f"| {r['peer_median_peak_memory_bytes'] / 2**20:,.0f} MiB | {r['median_peak_memory_ratio']:.2f} | {len(r['pairs'])} "
            f"| {r['measured_at']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/bench_cpu.yaml")
    p.add_argument("--style", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run after the first")
    p.add_argument("--override", action="append", default=[], help="another lmjax override (key=value); repeatable")
    p.add_argument("--peer-arg", action="append", default=[], help="another torch_reference.py option, e.g. "
                   "--peer-arg=--compile=step; repeatable")
    p.add_argument("--lmjax", default=".venv/bin/lmjax", help="relative paths are from the repository root")
    p.add_argument("--python", default=".venv/bin/python")
    p.add_argument("--peer-malloc", choices=("lmjax", "system"), default="lmjax",
                   help="the peer's allocator: the one the lmjax command picks (default), or python's own")
    p.add_argument("--out", default=None)
    p.add_argument("--table", action="store_true", help="print the markdown table of experiments/bench/results/peer/*.json and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(ROOT / "experiments/bench/results/peer"))
        return {}
    if args.pairs < 1:
        p.error("--pairs must be >= 1")

    overrides = lmjax_overrides(args.style, args.seq_len, args.batch, args.override)
    cfg = load_config(ROOT / args.config, overrides)
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = Path(args.out or ROOT / f"experiments/bench/results/peer/{args.style}_{args.seq_len}x{args.batch}.json")

    pairs, lmjax_config = [], None
    with tempfile.TemporaryDirectory() as tmp:
        lmjax_json, peer_json = Path(tmp, "lmjax.json"), Path(tmp, "peer.json")
        lmjax_cmd = [args.lmjax, "bench", args.config, *overrides, *timing, "--out", str(lmjax_json)]
        peer_cmd = [args.python, str(PEER.relative_to(ROOT)), *peer_cli_args(cfg), *timing, *args.peer_arg, "--out", str(peer_json)]
        peer_env = peer_malloc_environment(args.peer_malloc)
        print(f"lmjax: {' '.join(lmjax_cmd)}\npeer:  {' '.join(f'{k}={v}' for k, v in peer_env.items())} {' '.join(peer_cmd)}",
              flush=True)
        for i in range(args.pairs):
            order = ("lmjax", "peer") if i % 2 == 0 else ("peer", "lmjax")
            print(f"pair {i + 1}/{args.pairs} ({' then '.join(order)})", flush=True)
            results = {}
            for side in order:
                path = lmjax_json if side == "lmjax" else peer_json
                path.unlink(missing_ok=True)
                results[side] = (run_side(side, lmjax_cmd, path) if side == "lmjax" else
                                 run_side(side, peer_cmd, path, peer_env))
            lmjax_config = results["lmjax"].get("config")
            lj, pr = results["lmjax"], results["peer"]
            if lj["params_total"] != pr["params_total"]:
                raise PeerError(f"parameter counts differ: lmjax {lj['params_total']:,} vs peer {pr['params_total']:,}")
            peer = {k: pr[k] for k in KEPT if k in pr}
            # The peer's model FLOP rate and MFU by lmjax's own FLOP count and device peak.
            peer["tflops_per_sec"] = pr["tokens_per_sec"] * lj["model_flops_per_token"] / 1e12
            peer["mfu"] = ratio(pr["tokens_per_sec"] * lj["model_flops_per_token"], lj["peak_flops_per_device"])
            pairs.append({
                "order": list(order),
                "lmjax": {k: lj[k] for k in KEPT if k in lj},
                "peer": peer,
                "tokens_per_sec_ratio": ratio(lj["tokens_per_sec"], pr["tokens_per_sec"]),
                "peak_memory_ratio": ratio(lj["peak_memory_bytes"], pr["peak_memory_bytes"]),
            })
            last = pairs[-1]
            print(f"  lmjax/peer: tokens/s {last['tokens_per_sec_ratio']:.3f}  peak RSS {last['peak_memory_ratio']:.3f}  "
                  f"(lmjax MFU {lj['mfu']:.1%}, peer {peer['mfu']:.1%})", flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(pair[side][key] for pair in pairs)

    summary = {
        "median_tokens_per_sec_ratio": statistics.median(pair["tokens_per_sec_ratio"] for pair in pairs),
        "median_peak_memory_ratio": statistics.median(pair["peak_memory_ratio"] for pair in pairs),
        "lmjax_median_tokens_per_sec": median("lmjax", "tokens_per_sec"),
        "peer_median_tokens_per_sec": median("peer", "tokens_per_sec"),
        "lmjax_median_peak_memory_bytes": median("lmjax", "peak_memory_bytes"),
        "peer_median_peak_memory_bytes": median("peer", "peak_memory_bytes"),
        "params_total": pairs[0]["lmjax"]["params_total"],
    }
    print(f"{args.style} {args.seq_len}x{args.batch}, {summary['params_total'] / 1e6:.2f}M params, {len(pairs)} pairs: "
          f"lmjax {summary['lmjax_median_tokens_per_sec']:,.0f} vs peer {summary['peer_median_tokens_per_sec']:,.0f} tokens/s "
          f"(median ratio {summary['median_tokens_per_sec_ratio']:.3f}); peak RSS "
          f"{summary['lmjax_median_peak_memory_bytes'] / 2**20:,.0f} vs {summary['peer_median_peak_memory_bytes'] / 2**20:,.0f} MiB "
          f"(median ratio {summary['median_peak_memory_ratio']:.3f})")
    report = {
        **summary,
        "style": args.style, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "lmjax_command": lmjax_cmd, "peer_command": peer_cmd, "peer_malloc": args.peer_malloc, "peer_environment": peer_env,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pairs": pairs,
        "lmjax_config": lmjax_config,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except PeerError as e:
        sys.exit(f"peer: {e}")
