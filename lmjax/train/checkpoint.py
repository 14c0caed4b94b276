"""Checkpoints: orbax CheckpointManager holding the train state and the data-iterator state.

Both items are saved in one step directory, so a restore gives a state and the exact next batch
together. Saves are asynchronous (training continues while the arrays are written); orbax writes
to a temporary directory and renames it when complete, so a run killed mid-save keeps its
previous checkpoint intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

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
