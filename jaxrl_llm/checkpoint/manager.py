"""Orbax checkpoints of a run: the training state (any pytree of arrays: params, optimizer state, step,
RNG keys), the data iterator's position and a small JSON of loop counters, saved together under
``<run_dir>/checkpoints/<step>``.

Saves are asynchronous (the step loop continues while arrays are written; ``wait`` blocks), the manager
keeps the last ``keep`` steps, and every process writes its own shards (and its own iterator state).
``restore`` places the arrays with the shardings of the abstract state it is given, so a run resumes on
its mesh without ever holding an unsharded copy. It first compares the saved arrays' shapes with the
state's (from the checkpoint's metadata, reading no array), so a changed model is one error naming the
arrays that differ.

A kill while a save is being written leaves ``<step>.orbax-checkpoint-tmp``, which Orbax never lists as a
step: the latest complete checkpoint stays the latest (``incomplete_steps`` names the unfinished ones, and
the next save of that step replaces it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Iterator
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


class CheckpointDamagedError(UserError):
    """A checkpoint whose files cannot be read (truncated, deleted, or overwritten)."""


_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
# How an OS write error reads once Orbax and TensorStore have wrapped it (a ValueError with the text).
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")
_OS_ERROR = ("os_error_code=", "Permission denied", "Read-only file system", *_DISK_FULL)


class CheckpointWriteError(UserError):
    """A checkpoint that could not be written: the disk is full, or the directory is not writable."""


def _path_name(path: tuple[Any, ...]) -> str:
    """``params.layers.0.kernel.value``: a key path with dict keys, attribute names and indices alike."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): tuple(getattr(x, "shape", ())) for p, x in leaves}


def shape_differences(saved: dict[str, tuple[int, ...]], now: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between two ``{array name: shape}`` tables, in words (empty when they match)."""
    out = [
        f"{k}: {saved[k]} in the checkpoint, {now[k]} now" for k in now if k in saved and saved[k] != now[k]
    ]
    out += [f"{k}: only in the checkpoint" for k in saved if k not in now]
    out += [f"{k}: not in the checkpoint" for k in now if k not in saved]
    return out


@contextlib.contextmanager
def quiet_coroutines() -> Iterator[None]:
    """A failed restore leaves Orbax's pending reads to be garbage-collected, and Python prints each as an
    'Exception ignored in coroutine' traceback; the error itself is reported, so those are dropped."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Reading one item's metadata inside a composite checkpoint makes Orbax warn that the item has no
    ``_CHECKPOINT_METADATA`` of its own (the checkpoint has one); that warning says nothing wrong."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def set_aside(self, step: int, folder: str | os.PathLike) -> Path:
        """Moves checkpoint ``step`` into ``folder`` (kept for inspection, no longer a step of this run)."""
        dest = Path(folder) / str(step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.directory / str(step), dest)
        self._manager.reload()
        return dest

    def incomplete_steps(self) -> list[int]:
        """Steps whose save was started and never finished (the process was killed while writing)."""
        if not self.directory.is_dir():
            return []
        found = (_TMP.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def check_shapes(self, step: int, state: Any) -> None:
        """Raises ``CheckpointMismatchError`` naming the arrays whose shapes differ from ``state``'s (read
        from the checkpoint's metadata), ``CheckpointDamagedError`` when the metadata cannot be read."""
        where = self.directory / str(step)
        try:
            with quiet_coroutines(), _quiet_absl(), ocp.StandardCheckpointer() as reader:
                saved = _shapes(reader.metadata(where / "state").item_metadata.tree)
        except Exception as err:  # noqa: BLE001 - any unreadable metadata is a damaged checkpoint
            raise CheckpointDamagedError(
                f"checkpoint {where} cannot be read: {type(err).__name__}: {err}"
            ) from err
        diff = shape_differences(saved, _shapes(_raw_keys(state)))
        if diff:
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise CheckpointMismatchError(
                f"checkpoint {where} does not fit this run's model and optimizer ({len(diff)} arrays differ: "
                f"{shown}). Was model.* or optimizer.* changed since it was saved? Restore those settings, "
                "or start a new run_dir (with model.path pointing at this run to start from its weights)"
            )

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
        with self._write_errors():  # a previous asynchronous save's error surfaces here
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
        self.check_shapes(step, state)
        target = abstract(_raw_keys(state))
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            with quiet_coroutines():
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - missing or truncated files, whatever layer notices
            raise CheckpointDamagedError(
                f"checkpoint {self.directory / str(step)} cannot be restored (its shapes match, so a file is "
                f"missing, truncated or of another kind): {type(err).__name__}: {err}"
            ) from err
        new_state = jax.tree.map(
            lambda want, got: jax.random.wrap_key_data(got) if _is_key(want) else got,
            state,
            restored["state"],
        )
        return new_state, dict(restored["meta"] or {})

    def wait(self) -> None:
        with self._write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._failed:  # already reported; Orbax raises the same error again on the way out
            with contextlib.suppress(Exception):
                self._manager.close()
            return
        with self._write_errors():
            self._manager.wait_until_finished()
        self._manager.close()

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """An OS error writing a checkpoint (in Orbax's background threads, wrapped in whatever type) becomes
        one ``CheckpointWriteError`` naming the directory and what was kept; anything else is re-raised."""
        try:
            yield
        except Exception as err:
            text = f"{err} {err.__cause__ or ''}"
            if not isinstance(err, OSError) and not any(s in text for s in _OS_ERROR):
                raise
            self._failed = True
            # The save's other writes fail too, in threads and tasks nobody awaits; their tracebacks would
            # bury the one message that matters.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            logging.getLogger("absl").setLevel(logging.CRITICAL)
            full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                s in text for s in _DISK_FULL
            )
            reason = "no space left on device" if full else str(err).splitlines()[0][:300]
            try:
                self._manager.reload()
                latest = self._manager.latest_step()
            except Exception:  # noqa: BLE001 - the message is what matters now
                latest = None
            kept = (
                f"the last complete checkpoint, {self.directory / str(latest)}, is kept"
                if latest is not None
                else "no checkpoint had been completed"
            )
            raise CheckpointWriteError(
                f"{self.directory}: {reason} while writing a checkpoint; {kept} (an unfinished "
                "<step>.orbax-checkpoint-tmp is never resumed from). Free space (or fix the directory) and run "
                "the same command again to continue"
            ) from None
