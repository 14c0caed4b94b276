"""Train-step variants timed step by step in turn, for machines too noisy for whole runs one after another.

    .venv/bin/python experiments/bench/ab_steps.py --variant base --variant cores2 env:JAX_NUM_CPU_DEVICES=2 \\
        [--variant peer] [--config C] [--style S] [--seq-len L --batch B] [--rounds 20] [--out F.json]

Each `--variant NAME [env:VAR=VALUE ...] [key=value ...]` is one process: lmjax's step as `lmjax bench`
builds it, with those environment variables and lmjax overrides on top of the shared shape; the name
`peer` (or `peer-LABEL`, another one, e.g. with other env: settings) is the PyTorch peer
(torch_reference.py) of the same resolved config. Every process builds and
warms up its step first, one after another, then waits; a round then runs one step of each variant in
turn (the order reversed every other round, so a drift in the machine's speed falls on every variant
alike), while the others sleep. On this kind of machine (2 shared vCPUs) the speed of whole runs drifts
by 10-20% within minutes, which hides the 3-10% a change is worth; paired steps seconds apart do not.

Reported per variant: median step time (p10-p90), tokens/s, CPU seconds per step (the process's own)
and the cores they kept busy, peak RSS; and against the first variant the median of the per-round
ratios of step time (< 1: faster than the first). `--out` writes all of it, each step's times
included, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PEER = "peer"


def is_peer(name: str) -> bool:
    """`peer`, or `peer-LABEL` for another PyTorch peer process (with its own env: settings)."""
    return name == PEER or name.startswith(PEER + "-")


def parse_variant(tokens: list[str]) -> dict:
    """NAME [env:VAR=VALUE ...] [key=value ...] -> {name, env, overrides}."""
    name, *rest = tokens
    env, overrides = {}, []
    for token in rest:
        if token.startswith("env:"):
            var, sep, value = token[4:].partition("=")
            if not sep or not var:
                raise ValueError(f"variant {name}: expected env:VAR=VALUE, got {token!r}")
            env[var] = value
        elif "=" in token:
            overrides.append(token)
        else:
            raise ValueError(f"variant {name}: expected env:VAR=VALUE or an lmjax key=value override, got {token!r}")
    if is_peer(name) and overrides:
        raise ValueError(f"variant {name} is the PyTorch peer of the shared shape: it takes no lmjax overrides, got {overrides}")
    return {"name": name, "env": env, "overrides": overrides}


def child(side: str, config: str, overrides: list[str]) -> None:
    """Builds the step, warms it up, then runs one step per line read from stdin ('step I'), answering
    'wall cpu' seconds; 'quit' answers the peak RSS in bytes."""
    from steps import lmjax_step, peer_step

    if side == PEER:
        run_step, close = peer_step(config, overrides), (lambda: None)
    else:
        run_step, close = lmjax_step(config, overrides, __file__)
    for i in range(3):  # the first compiles (the peer's torch.compile) or warms up
        run_step(i)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            break
        wall0, cpu0 = time.perf_counter(), os.times()
        run_step(int(command[1]))
        wall1, cpu1 = time.perf_counter(), os.times()
        print(wall1 - wall0, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), flush=True)
    close()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)  # KiB on Linux


def start(variant: dict, args: argparse.Namespace) -> subprocess.Popen:
    side = PEER if is_peer(variant["name"]) else "lmjax"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--config", args.config,
           *args.overrides, *variant["overrides"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **variant["env"]}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the build's own messages go to stderr
        if line.strip() == "ready":
            return proc
    raise SystemExit(f"ab_steps: variant {variant['name']} exited with {proc.wait()} before its first step "
                     f"(its messages are above): {' '.join(cmd)}")


def ask(proc: subprocess.Popen, command: str) -> str:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def summarize(name: str, walls: list[float], cpus: list[float], rss: int, tokens_per_step: int) -> dict:
    q = statistics.quantiles(walls, n=10) if len(walls) > 1 else [walls[0]] * 9
    median = statistics.median(walls)
    return {"name": name, "median_step_s": median, "p10_step_s": q[0], "p90_step_s": q[-1],
            "tokens_per_sec": tokens_per_step / median, "cpu_s_per_step": statistics.median(cpus),
            "cores_busy": sum(cpus) / sum(walls), "peak_rss_bytes": rss, "step_s": walls, "cpu_s": cpus}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME [env:VAR=VALUE | key=value ...]",
                   help="one process per variant; 'peer' is the PyTorch peer (repeatable, at least two)")
    p.add_argument("--config", default="configs/bench_cpu.yaml")
    p.add_argument("--style", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between two steps (idle thread pools settle)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=("lmjax", PEER), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)  # the children's resolved lmjax overrides
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.config, args.overrides)
        return {}
    from peer import PeerError, lmjax_overrides, peer_cli_args

    from lmjax.config import load_config
    from lmjax.errors import UserError

    if args.overrides:
        p.error(f"unexpected arguments {args.overrides}: lmjax overrides belong to a --variant")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    try:
        variants = [parse_variant(tokens) for tokens in args.variant or []]
    except ValueError as e:
        p.error(str(e))
    names = [v["name"] for v in variants]
    if len(variants) < 2 or len(set(names)) != len(names):
        p.error(f"expected at least two --variant with distinct names, got {names}")
    args.overrides = lmjax_overrides(args.style, args.seq_len, args.batch, [])
    cfgs = []
    for v in variants:  # bad overrides fail here, in one line, not inside a child
        try:
            cfgs.append(load_config(args.config, args.overrides + v["overrides"]))
            if is_peer(v["name"]):
                peer_cli_args(cfgs[-1])
        except (UserError, PeerError) as e:
            p.error(f"{v['name']}: {e}")
    tokens_per_step = cfgs[0].data.seq_len * cfgs[0].data.global_batch_size

    procs = {}
    try:
        for v in variants:
            t = time.perf_counter()
            procs[v["name"]] = start(v, args)
            print(f"{v['name']}: ready in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        times = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                time.sleep(args.pause)
                wall, cpu = map(float, ask(procs[name], f"step {3 + r}").split())
                times[name].append((wall, cpu))
        rss = {name: int(ask(procs[name], "quit")) for name in names}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    results = [summarize(n, [w for w, _ in times[n]], [c for _, c in times[n]], rss[n], tokens_per_step) for n in names]
    base = times[names[0]]
    for res in results[1:]:
        res["step_ratio_to_first"] = statistics.median(w / b for (w, _), (b, _) in zip(times[res["name"]], base))
        res["rss_ratio_to_first"] = res["peak_rss_bytes"] / results[0]["peak_rss_bytes"]
    for res in results:
        vs = f" | step {res['step_ratio_to_first']:.3f}x, RSS {res['rss_ratio_to_first']:.3f}x of {names[0]}" if "step_ratio_to_first" in res else ""
        print(f"{res['name']:>12s}: step {res['median_step_s'] * 1e3:,.0f} ms (p10 {res['p10_step_s'] * 1e3:,.0f}, "
              f"p90 {res['p90_step_s'] * 1e3:,.0f}) | {res['tokens_per_sec']:,.0f} tokens/s | {res['cpu_s_per_step']:.2f} CPU s "
              f"({res['cores_busy']:.2f} cores busy) | peak RSS {res['peak_rss_bytes'] / 2**20:,.0f} MiB{vs}")
    report = {"config": args.config, "overrides": args.overrides, "rounds": args.rounds,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "variants": variants, "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # peer.py and steps.py, beside this file
    main()
