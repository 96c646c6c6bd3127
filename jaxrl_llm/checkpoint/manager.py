"""Orbax checkpoints of a run: the training state (any pytree of arrays: params, optimizer state, step,
RNG keys), the data iterator's position and a small JSON of loop counters, saved together under
``<run_dir>/checkpoints/<step>``.

Saves are asynchronous (the step loop continues while arrays are written; ``wait`` blocks), the manager
keeps the last ``keep`` steps, and every process writes its own shards (and its own iterator state).
``restore`` places the arrays with the shardings of the abstract state it is given, so a run resumes on
its mesh without ever holding an unsharded copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxrl_llm.errors import UserError
from jaxrl_llm.parallel import abstract

DIRNAME = "checkpoints"


class CheckpointMismatchError(UserError):
    """A checkpoint that does not fit the model/optimizer being resumed."""


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _raw_keys(tree: Any) -> Any:
    """Typed PRNG keys are stored as their raw ``uint32`` data (arrays and abstract shapes alike)."""

    def one(x: Any) -> Any:
        if not _is_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
        return jax.random.key_data(x)

    return jax.tree.map(one, tree)


class Checkpointer:
    """Saves and restores a run's checkpoints in ``<run_dir>/checkpoints``."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / DIRNAME
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator | None = None,
        meta: dict[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step``; returns whether a save was started."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(_raw_keys(state))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        items["meta"] = ocp.args.JsonSave(dict(meta or {}))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``state`` (arrays, or better
        ``jax.ShapeDtypeStruct``s with shardings, so that no second copy is held while restoring);
        sets ``data_iter``'s position in place. Returns ``(state, meta)``."""
        target = abstract(_raw_keys(state))
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match this run's model and optimizer "
                f"(was the config changed since it was saved?): {err}"
            ) from err
        new_state = jax.tree.map(
            lambda want, got: jax.random.wrap_key_data(got) if _is_key(want) else got,
            state,
            restored["state"],
        )
        return new_state, dict(restored["meta"] or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
