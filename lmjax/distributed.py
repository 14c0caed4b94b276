"""Multi-host start-up: `jax.distributed.initialize` from the environment, before any device use.

- TPU pods and SLURM `srun` steps: jax detects the coordinator and process ids itself (its cluster
  plugins read the TPU metadata / SLURM_* variables); we only need to ask it to.
- Anywhere else: LMJAX_COORDINATOR (host:port), LMJAX_NUM_PROCESSES, LMJAX_PROCESS_ID.
A single process with none of these set runs without initialising anything.
"""

from __future__ import annotations

import os

import jax

from lmjax.errors import UserError

_initialized = False


def _under_srun() -> bool:
    """One task of a multi-task `srun` step (not a batch script that merely has several tasks)."""
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1


def initialize() -> None:
    global _initialized
    if _initialized:
        return
    explicit = os.environ.get("LMJAX_COORDINATOR")
    if explicit:
        try:
            num_processes = int(os.environ["LMJAX_NUM_PROCESSES"])
            process_id = int(os.environ["LMJAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError(
                "LMJAX_COORDINATOR is set: LMJAX_NUM_PROCESSES and LMJAX_PROCESS_ID must be set to integers too"
            ) from None
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(explicit, num_processes=num_processes, process_id=process_id)
    elif _under_srun() or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
    _initialized = True
