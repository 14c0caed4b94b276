"""wandb across resumes, offline and for real: a run killed between checkpoints and resumed sends
each step to its wandb run once, read back from the `.wandb` files wandb wrote."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from lmjax.config import load_config
from lmjax.train.loop import train
from lmjax.train.metrics import MetricsLogger


def wandb_records(path: Path) -> list:
    """The records of one `.wandb` file: wandb's transaction log is a leveldb log (a 7-byte
    header, then 32 KiB blocks of chunks: crc32, uint16 length, uint8 type FULL=1 FIRST=2
    MIDDLE=3 LAST=4, data) of `wandb_internal_pb2.Record` protobufs. wandb 0.31 ships no Python
    reader of its own (`wandb.sdk.internal.datastore` is gone), so this is the format, read here."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-filled trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _segments(run_dir: Path) -> list[dict]:
    """Per offline segment (in start order): its run id and {step: loss} of its history."""
    segments = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = directory.glob("*.wandb")
        run_id, losses = None, {}
        for record in wandb_records(log):
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                items = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
                if "loss" in items:
                    assert record.history.step.num not in losses, "a step logged twice within one segment"
                    losses[record.history.step.num] = json.loads(items["loss"])
        segments.append({"id": run_id, "losses": losses})
    return segments


class Killed(Exception):
    pass


def _train_until_logged(cfg, step: int, monkeypatch) -> None:
    """Trains until step `step`'s metrics are logged, then dies as a kill would (no checkpoint)."""
    real_log = MetricsLogger.log

    def log_then_die(self, record):
        real_log(self, record)
        if record["step"] == step and "loss" in record:
            raise Killed

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    time.sleep(1.1)  # wandb names a segment's folder by the second it starts


def test_resumed_run_sends_each_step_to_wandb_once(tmp_path, tiny_overrides, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.steps=6", "train.checkpoint_every=3", "logging.wandb=offline",
                                              f"run_dir={run_dir}"])
    _train_until_logged(cfg, 5, monkeypatch)  # checkpoint 3, wandb has steps 1-5
    _train_until_logged(cfg, 4, monkeypatch)  # resumed at 3, killed again short of where the first got
    assert (run_dir / "wandb_sent_through").read_text() == "5"
    train(cfg)

    segments = _segments(run_dir)
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [s["id"] for s in segments] == [run_id] * 3  # one wandb run, resumed
    assert [sorted(s["losses"]) for s in segments] == [[1, 2, 3, 4, 5], [], [6]]
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    file_losses = {r["step"]: r["loss"] for r in jsonl if "loss" in r}
    assert sorted(file_losses) == [1, 2, 3, 4, 5, 6] and len([r for r in jsonl if "loss" in r]) == 6
    sent = {step: loss for s in segments for step, loss in s["losses"].items()}
    assert sent == pytest.approx(file_losses, rel=1e-6)  # the recomputed 4 and 5 equal those sent first
