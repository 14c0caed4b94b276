"""Metrics sinks: `run_dir/metrics.jsonl` (the source of truth), wandb (a mirror), a progress bar.

wandb runs offline unless the user has configured it (WANDB_MODE or WANDB_API_KEY), so no
account is needed; `logging.wandb=off` turns it off. Only process 0 writes.

A resumed run continues its wandb run (the id kept in run_dir/wandb_id) and sends each step to
wandb once (run_dir/wandb_sent_through: how far earlier segments went). The steps between the checkpoint and the interruption were sent by the interrupted
segment; the resumed one recomputes them (metrics.jsonl keeps the new values: the same bits on
the same hardware, the same to float precision on another mesh) but does not send them again.
Offline, each segment is its own `wandb/offline-run-*-<id>` directory holding only steps after
the previous one's, and `wandb sync` appends the files of one id in start-time order.
wandb's rewind (`resume_from="<id>?_step=<n>"`) is not used: the server offers it as a preview
(not on self-managed servers), refuses to rewind a run it still sees running (one killed a moment
ago), and offline wandb only records the request, to be applied by whichever server syncs it.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from lmjax.config import Config, to_dict
from lmjax.fileio import write_text_atomic


def _wandb_mode(setting: str) -> str:
    if setting != "auto":
        return "disabled" if setting == "off" else setting
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible as a string
    return value


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int, total_steps: int):
        self.is_main = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.file = None
        self.wandb_run = None
        self.wandb_sent_through = 0  # the last step an earlier segment of the run sent to wandb
        self.bar = None
        if not self.is_main:
            return
        logged_through = self._truncate_after(start_step)
        self.file = self.path.open("a")
        mode = _wandb_mode(cfg.logging.wandb)
        if mode != "disabled":
            import wandb

            run_id_file, sent_file = run_dir / "wandb_id", run_dir / "wandb_sent_through"
            if run_id_file.exists():
                run_id = run_id_file.read_text().strip()
                # Earlier segments sent wandb what they wrote to metrics.jsonl (log() writes both);
                # a segment that stopped short of the one before it truncated the file below what
                # that one had sent, which wandb_sent_through remembers.
                before = int(sent_file.read_text()) if sent_file.exists() else 0
                self.wandb_sent_through = max(logged_through, before)
            else:
                run_id = uuid.uuid4().hex[:12]
            write_text_atomic(run_id_file, run_id)
            write_text_atomic(sent_file, str(self.wandb_sent_through))
            self.wandb_run = wandb.init(
                project=cfg.logging.wandb_project,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                config=to_dict(cfg),
            )
        if cfg.logging.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def _truncate_after(self, step: int) -> int:
        """On resume, drop lines logged after the checkpoint so the file has each step once.
        Returns the last step the file held before: how far the earlier segments logged."""
        if not self.path.exists():
            return 0
        kept, last = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            last = max(last, record.get("step", 0))
            if record.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return last

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None and record["step"] > self.wandb_sent_through:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress(self, step: int, loss: float | None, tokens_per_sec: float | None) -> None:
        if self.bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.3f}"
        if tokens_per_sec:
            postfix["tok/s"] = f"{tokens_per_sec:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)  # redraws at most every `mininterval` seconds

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
