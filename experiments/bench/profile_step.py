"""Where the train step's time goes on XLA:CPU: a per-op time table of the step `lmjax bench` times.

    .venv/bin/python experiments/bench/profile_step.py CONFIG [key=value ...] [--steps 3] [--top 25] [--out F.json]

The step is built, compiled and fed as in `lmjax bench` (lmjax.bench.prepare / compile_step, the CLI's
XLA defaults and huge-page malloc); after 2 warm-up steps jax.profiler traces `--steps` steps. On XLA:CPU the trace holds one
event per executed thunk on the XLA worker threads, named by its HLO instruction (args.hlo_op) and
tagged with the step's run_id; a while thunk's event encloses some of its body's, so each op counts its
self time. Categories come from the optimized HLO: a fusion whose body has a dot is a matmul fusion.

A matmul thunk runs asynchronously on the Eigen pool: its event ends when the work is handed out,
not when it is done, and the ops that need its result start only after. The time when no op event
is open (the gaps, about two thirds of the step at bench_cpu) is therefore charged to the matmul
dispatched last before each gap (`async_ms`): an attribution, exact for a chain of dependent ops,
approximate where independent work overlaps. `op events cover` states both sums.
"""

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from lmjax.cli import _load, dispatch_inline_under_jemalloc, parse_with_overrides, restart_with_tuned_malloc, set_cpu_xla_defaults

if __name__ == "__main__":
    # As the `lmjax` command does: without huge pages every step faults its temporaries in again, and
    # the profile would charge that to the copies and broadcasts that first touch them.
    restart_with_tuned_malloc(sys.argv[1:], program=[os.path.abspath(__file__)])
set_cpu_xla_defaults()  # before jax starts: the same matmul backend as `lmjax bench`
dispatch_inline_under_jemalloc()  # and the same dispatch

import jax  # noqa: E402

from lmjax import sharding  # noqa: E402
from lmjax.bench import compile_step, prepare  # noqa: E402
from lmjax.errors import UserError  # noqa: E402

WARMUP = 2
MOVES = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
         "concatenate", "pad", "reverse", "iota", "parameter", "constant", "tuple", "get-tuple-element"}
KEYS = (({"dot"}, "matmul/dot"), ({"convolution"}, "convolution"), ({"custom-call"}, "custom-call"),
        ({"reduce", "reduce-window"}, "reduce"))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")


def parse_hlo(text: str) -> tuple[str, dict[str, dict]]:
    """The module's name, and per instruction: opcode, body (the opcodes of what it calls, nested calls
    included; scalar index arithmetic left out), custom-call target and source op_name."""
    module = re.match(r"HloModule (\S+?),?\s", text)
    computations: dict[str, list[str]] = {}  # name -> its instructions' names
    instructions, body = {}, []
    for line in text.splitlines():
        if line.endswith("{") and "%" in line and " = " not in line:  # `[ENTRY ]%name (params) -> shape {`
            body = computations.setdefault(line.split("%", 1)[1].split(" ", 1)[0], [])
        elif m := INSTRUCTION.match(line):
            name, shape, opcode, rest = m.groups()
            body.append(name)
            attribute = dict(re.findall(r'(custom_call_target|op_name)="([^"]*)"', rest))
            instructions[name] = {"opcode": opcode, "scalar": re.fullmatch(r"[a-z0-9]+\[\]", shape) is not None,
                                  "calls": re.findall(r"(?:calls|body|condition|to_apply)=\{?%([\w.-]+)", rest),
                                  "target": attribute.get("custom_call_target", ""), "op_name": attribute.get("op_name", "")}
    for inst in instructions.values():
        inst["body"], todo = set(), list(inst["calls"])
        while todo:  # HLO's call graph has no cycles
            for callee in map(instructions.get, computations.get(todo.pop(), [])):
                todo += callee["calls"]
                if not callee["scalar"] or callee["opcode"] in ("dot", "reduce", "reduce-window", "custom-call"):
                    inst["body"].add(callee["opcode"])
    return (module[1] if module else ""), instructions


def categorize(name: str, inst: dict | None) -> tuple[str, str]:
    """(category, kind) from the HLO instruction, or from the op's name where the HLO lacks it."""
    op = inst["opcode"] if inst else name.rsplit(".", 1)[0].removeprefix("wrapped_")
    ops = inst["body"] if inst and op == "fusion" else {op}
    if op.replace("-start", "") in COLLECTIVES:
        return "collective", op
    for keys, category in KEYS:
        if ops & keys:
            return category, (f"{category.split('/')[0]} fusion" if op == "fusion" else
                              f"custom-call {inst['target']}" if inst and op == "custom-call" else op)
    if (ops and ops <= MOVES) or (not inst and ("copy" in op or "transpose" in op)):
        return "copy/transpose", "copy fusion" if op == "fusion" else op
    if op == "fusion" or (not inst and "fusion" in op):
        return "fusion (element-wise)", "element-wise fusion"
    return "other", op


def where(op_name: str) -> str:
    """An op's source, short: forward or backward pass, then the last three parts of its JAX name."""
    direction = "bwd " if "transpose(jvp(" in op_name else "fwd " if "jvp(" in op_name else ""
    return direction + "/".join(re.sub(r"^jit\([^)]*\)/", "", op_name).split("/")[-3:]) if op_name else ""


def op_events(trace_dir: str, module: str) -> list[dict]:
    """The trace's XLA op events of `module`, each with its self time `self_us` (nested op events excluded)."""
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz")) or sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    events = json.loads(gzip.decompress(files[-1].read_bytes()))["traceEvents"]  # the newest: folders are named by time
    ops = [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("hlo_op")
           and e["args"].get("hlo_module") in (module, None)]
    stacks = collections.defaultdict(list)  # per thread: the op events enclosing the current one
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        e["self_us"], stack = e["dur"], stacks[(e["pid"], e["tid"])]
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
            stack.pop()
        if stack:
            stack[-1]["self_us"] -= e["dur"]
        stack.append(e)
    return ops


def busy_us(ops: list[dict]) -> float:
    """Time at least one op ran (the union of the op intervals on all threads)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def charge_gaps_to_async_ops(step_ops: list[dict], is_async) -> dict[str, float]:
    """{hlo_op: microseconds} of the step's gaps (no op event open on any thread), each charged to the
    last op before it for which `is_async(event)` holds (the matmul whose result the next op awaits)."""
    charged: dict[str, float] = collections.defaultdict(float)
    last_async, end = None, None
    for e in sorted(step_ops, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end and last_async is not None:
            charged[last_async] += e["ts"] - end
        if is_async(e):
            last_async = e["args"]["hlo_op"]
        end = max(end or e["ts"], e["ts"] + e["dur"])
    return charged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file, or a run directory")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=25, help="ops to print")
    parser.add_argument("--out", default=None, help="write the whole table as JSON to this file")
    parser.add_argument("--trace-dir", default=None, help="keep the trace here, for Perfetto (default: a temporary folder)")
    args = parse_with_overrides(parser, argv)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    cfg = _load(args)  # as `lmjax bench` loads it
    jax.config.update("jax_enable_compilation_cache", False)  # as bench: compiled here, its HLO at hand
    setup, train_iter, batches = prepare(cfg, min(4, args.steps + WARMUP))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # only the XLA ops are read; Python events would slow the steps
    with sharding.activate(setup.mesh, setup.rules), tempfile.TemporaryDirectory() as tmp:
        state, compiled, _ = compile_step(setup, cfg.seed, batches[0])
        for i in range(WARMUP):
            state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        step_times = []
        with jax.profiler.trace(args.trace_dir or tmp, create_perfetto_trace=True, profiler_options=options):
            for i in range(args.steps):
                t = time.perf_counter()
                state, metrics = compiled(state, batches[(i + WARMUP) % len(batches)])
                jax.block_until_ready(metrics)
                step_times.append(time.perf_counter() - t)
        module, instructions = parse_hlo(compiled.as_text())
        ops = op_events(args.trace_dir or tmp, module)
    train_iter.close()

    table: dict[str, dict] = {}
    per_run = collections.defaultdict(list)  # run_id -> the op events of one step
    for e in ops:
        per_run[e["args"]["run_id"]].append(e)
        if (name := e["args"]["hlo_op"]) not in table:
            inst = instructions.get(name)
            category, kind = categorize(name, inst)
            table[name] = {"op": name, "category": category, "kind": kind, "where": where(inst["op_name"] if inst else ""),
                           "total_s": 0.0, "count": 0}
        table[name]["total_s"] += e["self_us"] / 1e6
        table[name]["count"] += 1
    runs = sorted(per_run.values(), key=lambda es: min(e["ts"] for e in es))
    for step_ops in runs:
        gaps = charge_gaps_to_async_ops(step_ops, lambda e: table[e["args"]["hlo_op"]]["category"] == "matmul/dot")
        for name, us in gaps.items():
            table[name]["async_s"] = table[name].get("async_s", 0.0) + us / 1e6
    for r in table.values():
        r["events_s"] = r["total_s"]
        r["total_s"] += r.setdefault("async_s", 0.0)
    wall_s, rows = sum(step_times), sorted(table.values(), key=lambda r: -r["total_s"])
    for r in rows:
        r["per_step_ms"], r["pct_of_step"] = r["total_s"] / args.steps * 1e3, 100 * r["total_s"] / wall_s
    categories = {c: {key: sum(r[key] for r in rows if r["category"] == c) for key in ("per_step_ms", "pct_of_step")}
                  | {"ops": sum(r["category"] == c for r in rows)} for c in {r["category"] for r in rows}}
    coverage = {"events": sum(r["events_s"] for r in rows) / wall_s, "union": sum(map(busy_us, runs)) / 1e6 / wall_s,
                "with_gaps_charged": sum(r["total_s"] for r in rows) / wall_s}
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"

    print(f"{device} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | {len(table)} ops of {len(instructions)} "
          f"HLO instructions ran in {len(runs)} traced steps")
    for i, (t, es) in enumerate(zip(step_times, runs)):
        span_ms = (max(e["ts"] + e["dur"] for e in es) - min(e["ts"] for e in es)) / 1e3
        print(f"step {i}: wall {t * 1e3:7.2f} ms | op time {sum(e['self_us'] for e in es) / 1e3:7.2f} ms | ops busy "
              f"{busy_us(es) / 1e3:7.2f} ms | first op start to last op end {span_ms:7.2f} ms | {len(es)} op events")
    print(f"op events cover {coverage['events']:.0%} of the wall step time (op times summed over threads), "
          f"{coverage['union']:.0%} (time at least one op ran); with the gaps charged to the matmul dispatched "
          f"before each, {coverage['with_gaps_charged']:.0%}\n")
    print(f"{'op':34s} {'category':21s} {'kind':19s} {'total ms':>8s} {'ms/step':>8s} {'async':>7s} {'% step':>6s} "
          f"{'count':>5s}  where")
    for r in rows[: args.top]:
        print(f"{r['op'][:34]:34s} {r['category']:21s} {r['kind'][:19]:19s} {r['total_s'] * 1e3:8.2f} "
              f"{r['per_step_ms']:8.3f} {r['async_s'] / args.steps * 1e3:7.1f} {r['pct_of_step']:5.1f}% {r['count']:5d}  "
              f"{r['where']}")
    print(f"\n{'category':21s} {'ms/step':>8s} {'% step':>7s} {'ops':>5s}")
    for name, c in sorted(categories.items(), key=lambda kv: -kv[1]["per_step_ms"]):
        print(f"{name:21s} {c['per_step_ms']:8.3f} {c['pct_of_step']:6.1f}% {c['ops']:5d}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "config": args.config, "overrides": args.overrides, "steps": args.steps, "step_times_s": step_times,
            "coverage": coverage, "categories": categories, "ops": rows, "device": device,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
