"""Checkpoints: orbax CheckpointManager holding the train state and the data-iterator state.

Both items are saved in one step directory, so a restore gives a state and the exact next batch
together. Saves are asynchronous (training continues while the arrays are written); orbax writes
to a temporary directory and renames it when complete, so a run killed mid-save keeps its
previous checkpoint intact.

Resuming (`restore_latest`) reads the newest checkpoint that is whole. One that cannot be read
(files missing, truncated or overwritten) is reported, renamed aside and the one before it is
used; one that reads but holds another model or optimizer is an error (see `restore_latest`).
"""

from __future__ import annotations

import gc
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmjax.errors import CheckpointError


class _ReadOnlyNotices(logging.Filter):
    """Drops orbax's notices that a read-only manager is read-only (three per `lmjax eval` or
    `generate`, which asked for exactly that); every other orbax message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or message.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


def _first_line(error: Exception) -> str:
    """The first line of an orbax error (they run to pages of tree diffs), for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _reason(error: Exception) -> str:
    """Why a checkpoint could not be read, on one line: the innermost cause (orbax wraps
    tensorstore's DATA_LOSS / NOT_FOUND in a generic "error while reading array index")."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [""]
    message = re.sub(r' at local file "[^"]*"', "", lines[0])  # the warning names the checkpoint already
    return f"{type(error).__name__}: {message[:200]}"


_quieted = False


def _quiet_abandoned_reads() -> None:
    """After a failed read, orbax leaves the other shards' reads behind: coroutines whose errors
    Python prints when they are collected (pages of tensorstore specs each, at any later moment)
    and callbacks into the closed event loop. The one-line warning has said why the checkpoint
    is unreadable, so those two kinds of message are dropped from then on; every other passes."""
    global _quieted
    if _quieted:
        return
    _quieted, previous = True, sys.unraisablehook

    def hook(unraisable) -> None:
        message = str(unraisable.exc_value)
        if message.startswith("Encountered error while reading array index") or message == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params/embed/embedding": shape} for a state tree or orbax's metadata tree of one (dict
    keys, dataclass fields and sequence indices all become path names, as orbax stores them)."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _failed_processes(ok: bool) -> list[int]:
    """The processes where `ok` is False: a checkpoint whose shard one host cannot read is
    unreadable for the run, and every process must restore the same step."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    flags = np.asarray(multihost_utils.process_allgather(np.int32(ok))).ravel()
    return [i for i, flag in enumerate(flags) if not flag]


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int, async_save: bool = True, read_only: bool = False):
        """`read_only` for readers (eval, generate): they never create, clean up or delete anything,
        so they are safe to run beside a live training run."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,  # a writer drops what a killed save left half-written
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this config's model/optimizer "
                f"({_first_line(e)}); use a new run_dir or the config the run was started with"
            ) from None
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, data state) of the newest readable checkpoint; None when there is none.

        A checkpoint that cannot be read (a file missing, truncated or overwritten with garbage)
        is reported on one line and the previous one is tried. Once a readable one is found, the
        unreadable newer ones are renamed aside to `<step>.unreadable-<time>` in the same
        directory: kept for the user, but out of orbax's way, so the resumed run can save that
        step number again and max_to_keep never deletes them. When no checkpoint reads, nothing
        is renamed (a rerun must not silently start over) and that is an error. A checkpoint
        whose tree or shapes differ from `abstract_state` is a mismatch, an error too: an older
        checkpoint of the same run would hold the same model, so falling back would hide it.
        """
        unreadable: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            restored, error = self._try_restore(step, abstract_state)
            failed = _failed_processes(error is None)
            if not failed:
                self._set_aside(unreadable, step)
                return step, restored["state"], restored["data"]
            mismatch = self._mismatch(step, abstract_state)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} does not match this config's model/optimizer "
                    f"({mismatch}); use a new run_dir or the config the run was started with"
                )
            unreadable.append((step, error or f"process {', '.join(map(str, failed))} could not read its part"))
        if unreadable:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: steps {', '.join(str(s) for s, _ in unreadable)} "
                f"are damaged (step {unreadable[0][0]}: {unreadable[0][1]}); move them away to start the run over"
            )
        return None

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[dict[str, Any] | None, str | None]:
        """Reads step `step` through the item handlers, not the manager: the manager's restore
        ends in a barrier that a process whose read failed would never reach, hanging the others
        before the processes could agree the checkpoint is unreadable."""
        path = self.directory / str(step)
        state_handler, data_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
        try:
            state = state_handler.restore(path / "state", args=ocp.args.StandardRestore(abstract_state))
            data = data_handler.restore(path / "data", args=ocp.args.JsonRestore())
            return {"state": state, "data": data}, None
        except Exception as e:  # anything at all: the checkpoint is judged by the caller, on every process
            _quiet_abandoned_reads()
            return None, _reason(e)  # not `e`: its traceback would keep the abandoned reads alive
        finally:
            state_handler.close()
            data_handler.close()
            gc.collect()

    def _mismatch(self, step: int, abstract_state: Any) -> str | None:
        """How checkpoint `step`'s stored tree differs from `abstract_state`: None when they agree
        or the metadata itself cannot be read (then the checkpoint counts as unreadable)."""
        handler = ocp.StandardCheckpointHandler()
        try:
            stored = handler.metadata(self.directory / str(step) / "state")
            stored = getattr(stored, "tree", stored)
            stored_shapes = _leaf_shapes(stored) if stored else None
        except Exception:
            return None
        finally:
            handler.close()
        if not stored_shapes:
            return None
        expected = _leaf_shapes(abstract_state)
        missing, extra = sorted(set(expected) - set(stored_shapes)), sorted(set(stored_shapes) - set(expected))
        if missing or extra:
            parts = [f"it lacks {len(missing)} array(s) of this config's, e.g. {missing[0]}"] if missing else []
            parts += [f"it has {len(extra)} array(s) this config does not, e.g. {extra[0]}"] if extra else []
            return "; ".join(parts)
        for key, shape in expected.items():
            if stored_shapes[key] != shape:
                return f"{key} has shape {stored_shapes[key]}, expected {shape}"
        return None

    def _set_aside(self, unreadable: list[tuple[int, str]], resumed_step: int) -> None:
        """Renames unreadable step directories to `<step>.unreadable-<time>` (process 0; the others
        wait for it) with a one-line warning each, then makes orbax forget those steps."""
        if not unreadable:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, reason in unreadable:
                aside = self.directory / f"{step}.unreadable-{stamp}"
                for n in range(1, 100):  # never over an earlier one set aside in the same second
                    if not aside.exists():
                        break
                    aside = self.directory / f"{step}.unreadable-{stamp}-{n}"
                (self.directory / str(step)).rename(aside)
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable ({reason}); kept as "
                      f"{aside.name}, resuming from step {resumed_step}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lmjax-checkpoints-set-aside-{unreadable[0][0]}")
        self.manager.reload()

    def restore_params(self, step: int, abstract_params: Any, abstract_frozen: Any = None) -> Any:
        """The parameters alone of checkpoint `step` (with `abstract_frozen`, (params, frozen)), onto
        the shardings of the abstract trees (any mesh or host count): a fine-tuning run reads them
        without the source's optimizer state, readers (eval, generate) without their own, and a
        run directory written by `lmjax import-hf` holds nothing else."""
        items = {"params": abstract_params}
        if abstract_frozen:
            items["frozen"] = abstract_frozen
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), items)
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                self.directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(item=items, restore_args=restore_args, partial_restore=True),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)}: its parameters do not match this model ({_first_line(e)})"
            ) from None
        if abstract_frozen is None:
            return restored["params"]
        if abstract_frozen and "frozen" not in restored:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no frozen state (e.g. a DPO reference); "
                                  "it was not written by a run of this objective")
        return restored["params"], restored.get("frozen", {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
