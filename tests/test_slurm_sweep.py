"""A real SLURM: Debian's slurm-wlm on localhost (tests/slurm/start_local_slurm.sh installs and starts
it), a sweep through `lmjax sweep --executor slurm` as one job array, end to end to fit.json.

Marked `slurm`: not in the default run; `.ci/run` runs it (`pytest -m slurm`). Without root or the
network to install SLURM the test fails, it never skips.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    script = ROOT / "tests" / "slurm" / "start_local_slurm.sh"
    started = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1200)
    assert started.returncode == 0, f"{script} failed:\n{started.stderr[-4000:]}"
    conf = started.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    env = {**os.environ, "SLURM_CONF": conf}
    nodes = subprocess.run(["sinfo", "--noheader", "--format=%n %c %t"], capture_output=True, text=True, env=env)
    assert nodes.returncode == 0 and nodes.stdout.split()[0] == "localhost", nodes.stdout + nodes.stderr
    return env


def lmjax_sweep(sweep_file: Path, env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmjax.cli", "sweep", str(sweep_file), "--executor", "slurm", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def checkpointed_steps(run_dir: Path) -> list[int]:
    """The steps of the run's complete checkpoints (orbax's `checkpoints/<step>/`)."""
    return sorted(int(p.name) for p in run_dir.glob("checkpoints/*") if p.name.isdigit())


def test_sweep_runs_as_a_job_array_to_fit_json(tmp_path, slurm_env, data_cache):
    # The smallest sweep that fits: 2 budgets x 3 sizes (Approach 3 needs 6 runs, Approach 2 three
    # sizes per budget), 8 to 130 steps each, one CPU device per run.
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "sweep_dir": str(tmp_path / "sweep"),
        "base": {
            "model": {"vocab_size": 512, "n_kv_heads": None},
            "data": {"seq_len": 32, "global_batch_size": 16, "max_documents": 60, "val_fraction": 0.1,
                     "cache_dir": str(data_cache)},
            "train": {"log_every": 4, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 8},
            "logging": {"wandb": "off", "progress": False},
        },
        "budgets": [4.0e9, 8.0e9],
        "sizes": {4.0e9: [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                          {"d_model": 48, "n_layers": 1, "n_heads": 2, "d_ff": 96},
                          {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128}],
                  # 130 steps: long enough to be stopped in the middle
                  8.0e9: [{"d_model": 16, "n_layers": 1, "n_heads": 1, "d_ff": 32},
                          {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                          {"d_model": 48, "n_layers": 1, "n_heads": 2, "d_ff": 96}]},
        "schedule": {"min_steps": 8, "flops_tolerance": 0.05},
        "fit": {"bootstrap": 0},
    }, sort_keys=False))
    env = {**slurm_env, "XLA_FLAGS": ""}  # exported to the jobs: one CPU device per run
    sweep_dir = tmp_path / "sweep"

    refused = lmjax_sweep(sweep_file, env, "--slurm-partition", "nosuch")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: sbatch refused the job array: sbatch: error: ")
    assert "invalid partition" in refused.stderr.lower()

    # Ctrl-C once the long run has a checkpoint (step 8 to 40 of 130): the array is cancelled, its
    # running tasks get SIGTERM and forward it to lmjax, which saves a checkpoint and exits 143.
    long_run = sweep_dir / "runs" / "C8e9_N10800"
    start = time.perf_counter()
    first = subprocess.Popen([sys.executable, "-m", "lmjax.cli", "sweep", str(sweep_file), "--executor", "slurm",
                              "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             # A test runner started in the background (`cmd &`) ignores SIGINT, and so
                             # would this child: Python raises KeyboardInterrupt only when it starts with
                             # SIGINT at its default.
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not checkpointed_steps(long_run):
            assert first.poll() is None and time.perf_counter() - start < 600, "the long run never saved a checkpoint"
            time.sleep(0.2)
        assert checkpointed_steps(long_run)[-1] <= 40, "too late to stop the long run in the middle"
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 130, out
    stopped_at = checkpointed_steps(long_run)[-1]
    log = (long_run / "train.log").read_text()
    assert f"stopped by SIGTERM at step {stopped_at}; checkpoint saved" in log and "exit code 143" in log, log
    assert stopped_at < 130 and not (long_run / "summary.json").exists()

    # The rerun submits what is unfinished; the stopped run resumes from its checkpoint.
    done = lmjax_sweep(sweep_file, env, "--parallel", "2")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"6 runs through SLURM, 2 at a time, interrupted, resumed and fitted: {elapsed:.0f} s")
    assert f"resuming at step {stopped_at}" in (long_run / "train.log").read_text()
    plan = json.loads((sweep_dir / "plan.json").read_text())
    names = [entry["name"] for entry in plan["runs"]]
    assert len(names) == 6
    # _1 went with the refused submission, _2 with the interrupted one: each lists the runs still to do.
    assert (sweep_dir / "slurm" / "array_runs_2.txt").read_text().splitlines() == [
        str(sweep_dir / "runs" / name) for name in names]
    resubmitted = (sweep_dir / "slurm" / "array_runs_3.txt").read_text().splitlines()
    assert long_run.name in {Path(line).name for line in resubmitted} < set(names)  # the finished ones skipped
    job = done.stdout.split("submitted job array ")[1].split(":")[0]
    assert (f"--array=0-{len(resubmitted) - 1}%2 --output={sweep_dir}/slurm/%A_%a.out "
            f"--export=ALL,LMJAX_PYTHON={os.path.abspath(sys.executable)} ") in done.stdout
    for i, line in enumerate(resubmitted):
        run_dir = Path(line)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == plan["runs"][names.index(run_dir.name)]["steps"]
        # Array task i ran line i's run with the submitting interpreter, not an `lmjax` from PATH.
        log = (run_dir / "train.log").read_text()
        assert f"array task {job}_{i} on " in log
        assert f": {os.path.abspath(sys.executable)} -m lmjax.cli train {run_dir}/config.yaml" in log
        assert f"array task {job}_{i}: exit code 0" in (sweep_dir / "slurm" / f"{job}_{i}.out").read_text()
    fit = json.loads((sweep_dir / "fit.json").read_text())
    assert fit["n_runs"] == 6 and "skipped" not in fit["approach3"] and "skipped" not in fit["isoflop"]

    # A rerun submits nothing: every run is finished; it only fits again.
    again = lmjax_sweep(sweep_file, env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "6 of 6 runs already finished: skipped" in again.stdout and "submitted" not in again.stdout
    assert not (sweep_dir / "slurm" / "array_runs_4.txt").exists()
