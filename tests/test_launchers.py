"""Launchers (launch/) and sweep executors: the dry runs print the exact commands; the local
executor runs N runs at once, each on its own devices, and a failed run never stops the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmjax.cli import main as lmjax_main
from lmjax.scaling import plan as planlib
from lmjax.scaling.executors import LocalExecutor
from lmjax.scaling.sweep import run_sweep, write_plan

ROOT = Path(__file__).resolve().parents[1]
PYTHON = os.path.abspath(sys.executable)


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def tiny_sweep_file(folder: Path, data_cache: Path, **extra) -> Path:
    """One budget over small shapes: each run a few seconds (8 steps of 16 x 32 tokens)."""
    sweep = {
        "sweep_dir": str(folder / "sweep"),
        "base": {
            "model": {"vocab_size": 512, "n_kv_heads": None},
            "data": {"seq_len": 32, "global_batch_size": 16, "max_documents": 60, "val_fraction": 0.1,
                     "cache_dir": str(data_cache)},
            "train": {"log_every": 4, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 100},
            "logging": {"wandb": "off", "progress": False},
        },
        "budgets": [4.0e9],
        "sizes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                  {"d_model": 48, "n_layers": 1, "n_heads": 2, "d_ff": 96}],
        "schedule": {"min_steps": 8, "flops_tolerance": 0.05},
        "fit": {"bootstrap": 0},
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return folder / "sweep.yaml"


def planned(sweep_file: Path):
    plan = planlib.plan_sweep(*planlib.load_sweep(sweep_file))
    write_plan(plan)
    return plan


# ----------------------------------------------------------------------------- dry runs


def test_slurm_train_dry_run_prints_sbatch_and_the_srun_line():
    done = launch("slurm.py", "train", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00",
                  "configs/dense_1b.yaml", "run_dir=runs/1b", "--dry-run", "mesh.fsdp=-1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"sbatch --nodes=2 --gres=gpu:8 --partition=gpu --time=24:00:00 --export=ALL,LMJAX_PYTHON={PYTHON} "
        f"{ROOT}/launch/slurm_train.sbatch configs/dense_1b.yaml run_dir=runs/1b mesh.fsdp=-1",
        f"# then, in the job: srun --kill-on-bad-exit=1 {PYTHON} -m lmjax.cli train configs/dense_1b.yaml "
        "run_dir=runs/1b mesh.fsdp=-1",
    ]
    per_gpu = launch("slurm.py", "train", "--nodes", "4", "--gpus-per-node", "4", "--task-per-gpu", "c.yaml", "--dry-run")
    assert per_gpu.stdout.splitlines()[0] == (f"sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-task=1 "
                                              f"--export=ALL,LMJAX_PYTHON={PYTHON} {ROOT}/launch/slurm_train.sbatch c.yaml")
    # The batch script by hand: LMJAX_PYTHON unset -> python3 from the PATH.
    by_hand = subprocess.run(["bash", str(ROOT / "launch" / "slurm_train.sbatch"), "--dry-run", "c.yaml", "train.steps=5"],
                             capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LMJAX_PYTHON"})
    assert by_hand.stdout == "srun --kill-on-bad-exit=1 python3 -m lmjax.cli train c.yaml train.steps=5\n"


def test_slurm_sweep_dry_run_prints_the_array_of_unfinished_runs_and_writes_nothing(tmp_path, data_cache):
    sweep_file = tiny_sweep_file(tmp_path, data_cache, lr_grid=[1e-3, 3e-3])
    plan = planlib.plan_sweep(*planlib.load_sweep(sweep_file))
    assert len(plan.runs) == 4
    finished = plan.runs[1].run_dir
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"status": "completed"}))
    done = launch("slurm.py", "sweep", str(sweep_file), "--parallel", "2", "--slurm-cpus", "2", "--slurm-gpus", "1",
                  "--slurm-partition", "debug", "--slurm-time", "0:30:00", "--dry-run")
    assert done.returncode == 0, done.stderr
    slurm_dir = tmp_path / "sweep" / "slurm"
    runs_file = slurm_dir / "array_runs_1.txt"
    todo = [run.run_dir for i, run in enumerate(plan.runs) if i != 1]
    assert done.stdout.splitlines()[-5:] == [
        f"# would write {runs_file} (3 runs, array task i = line i):",
        *[f"#   {path}" for path in todo],
        f"sbatch --parsable --array=0-2%2 --output={slurm_dir}/%A_%a.out --export=ALL,LMJAX_PYTHON={PYTHON} "
        f"--cpus-per-task=2 --gres=gpu:1 --partition=debug --time=0:30:00 {ROOT}/launch/slurm_sweep.sbatch {runs_file}",
    ]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["runs"]  # no plan.json, no slurm/
    # By default each task asks for nothing: no GPU, the cluster's default CPUs, no array limit.
    default = launch("slurm.py", "sweep", str(sweep_file), "--dry-run")
    assert default.stdout.splitlines()[-1] == (f"sbatch --parsable --array=0-2 --output={slurm_dir}/%A_%a.out "
                                               f"--export=ALL,LMJAX_PYTHON={PYTHON} {ROOT}/launch/slurm_sweep.sbatch {runs_file}")
    # What array task i runs: line i's run, with the submitting interpreter.
    runs_file.parent.mkdir(parents=True)
    runs_file.write_text("".join(f"{p}\n" for p in todo))
    tasks = subprocess.run(["bash", str(ROOT / "launch" / "slurm_sweep.sbatch"), "--dry-run", str(runs_file)],
                           capture_output=True, text=True, env={**os.environ, "LMJAX_PYTHON": PYTHON})
    assert tasks.stdout.splitlines() == [f"task {i}: {PYTHON} -m lmjax.cli train {p}/config.yaml >> {p}/train.log 2>&1"
                                         for i, p in enumerate(todo)]


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    done = launch("tpu_pod.py", "--name", "pod1", "--zone", "us-central2-b", "--workdir", "/home/me/lmjax",
                  "--python", "/home/me/lmjax/.venv/bin/python", "configs/dense_1b.yaml", "run_dir=/mnt/runs/1b", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm ssh pod1 --zone=us-central2-b --worker=all --command "
        "'cd /home/me/lmjax && /home/me/lmjax/.venv/bin/python -m lmjax.cli train configs/dense_1b.yaml run_dir=/mnt/runs/1b'"]
    queued = launch("tpu_pod.py", "--name", "pod1", "--zone", "z", "--project", "p", "--queued", "--accelerator-type",
                    "v5litepod-16", "--runtime-version", "v2-alpha-tpuv5-lite", "--spot", "c.yaml", "--dry-run")
    assert queued.stdout.splitlines() == [
        "gcloud compute tpus queued-resources create pod1 --zone=z --project=p --node-id=pod1 "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
        "gcloud compute tpus queued-resources describe pod1 --zone=z --project=p --format 'value(state.state)'"
        "  # every 30 s until it prints ACTIVE",
        f"gcloud compute tpus tpu-vm ssh pod1 --zone=z --project=p --worker=all --command 'cd {ROOT} && {PYTHON} "
        "-m lmjax.cli train c.yaml'",
    ]
    bad = launch("tpu_pod.py", "--name", "pod1", "--zone", "z", "--spot", "c.yaml")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --accelerator-type, --runtime-version and --spot create a queued resource: add --queued")


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "error: --parallel must be a whole number >= 1 (runs at once); got 0"),
    (["--slurm-cpus", "4"], "error: --slurm-cpus/--slurm-gpus/--slurm-partition/--slurm-time apply to --executor slurm only"),
    (["--executor", "slurm"], "error: --executor slurm needs SLURM's sbatch on PATH (run it on a SLURM login node); not found"),
])
def test_bad_executor_arguments_get_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert lmjax_main(["sweep", str(ROOT / "configs" / "sweeps" / "quickstart.yaml"), *args]) == 2
    assert capsys.readouterr().err.strip() == message


# ----------------------------------------------------------------------------- local executor


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `python -m lmjax.cli train RUN_DIR/config.yaml`: records what it was given.
run_dir=$(dirname "$4")
start=$(date +%s.%N)
sleep 1.5
grep Cpus_allowed_list /proc/self/status | cut -f2 > "$run_dir/cpus"
printf '%s %s %s %s\\n' "${CUDA_VISIBLE_DEVICES-unset}" "$OMP_NUM_THREADS" "$start" "$(date +%s.%N)" > "$run_dir/seen"
case "$run_dir" in *lr1e30*) echo "diverged on purpose"; exit 3;; esac
echo '{"status": "completed", "final_eval_loss": 1.0}' > "$run_dir/summary.json"
"""


def test_parallel_runs_are_pinned_to_their_own_devices_and_a_failure_stops_no_other(tmp_path, data_cache):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "this test pins two runs to a core each"
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    plan = planned(tiny_sweep_file(tmp_path, data_cache, lr_grid=[1e30, 3e-3]))
    executor = LocalExecutor(parallel=2, python=str(python), gpus=["0", "1", "2", "3", "4"], cpus=cpus)
    failures = run_sweep(plan, executor)
    bad = sorted(run.name for run in plan.runs if "lr1e30" in run.name)
    assert len(bad) == 2 and sorted(failures) == bad
    assert all(reason == "exit code 3: diverged on purpose" for reason in failures.values())
    seen = {}
    for run in plan.runs:
        gpus, threads, start, end = (run.run_dir / "seen").read_text().split()
        seen[run.name] = ((run.run_dir / "cpus").read_text().strip(), gpus, float(start), float(end))
        assert threads == "1"
        assert (run.run_dir / "summary.json").exists() == (run.name not in bad)
    # Two shares: one core and two GPUs each (the fifth GPU unused, so both runs see as many).
    assert {(c, g) for c, g, _, _ in seen.values()} == {(str(cpus[0]), "0,1"), (str(cpus[1]), "2,3")}
    for a in seen.values():  # every run overlapped another, never one on the same share
        overlapping = [b for b in seen.values() if b is not a and b[2] < a[3] and a[2] < b[3]]
        assert overlapping and all(b[:2] != a[:2] for b in overlapping)


@pytest.mark.slow  # two real runs on 2 cores: CI's slow pass
def test_two_real_runs_at_once_both_finish(tmp_path, data_cache, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per run, not the 8 fake ones of the tests: faster to compile
    plan = planned(tiny_sweep_file(tmp_path, data_cache, budgets=[2.0e9]))
    started = time.time()
    assert run_sweep(plan, LocalExecutor(parallel=2, cpus=sorted(os.sched_getaffinity(0))[:2])) == {}
    intervals = []
    for run in plan.runs:
        summary = json.loads((run.run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == run.steps
        header = (run.run_dir / "train.log").read_text().splitlines()[0]
        assert header.startswith("# lmjax sweep") and f"{sys.executable} -m lmjax.cli train {run.run_dir}/config.yaml" in header
        start = time.mktime(time.strptime(header.split(", ")[1], "%Y-%m-%d %H:%M:%S"))
        intervals.append((start, (run.run_dir / "summary.json").stat().st_mtime))
    (a_start, a_end), (b_start, b_end) = intervals
    assert started - 1 <= a_start < b_end and b_start < a_end  # ran at the same time
