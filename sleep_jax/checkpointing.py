"""Checkpoints of a training run: the train state and the data position, saved atomically.

A checkpoint is one Orbax step directory `<dir>/<step>/` holding two items:

* `state`: the train state pytree (step, parameter weights, optimiser state, rng), restored into
  an abstract target that carries the shardings, so every device reads only its own shards;
* `data`: the Grain iterator position, written by `grain.checkpoint.CheckpointSave` (one small JSON
  file per process).

Orbax writes a step into a temporary directory and renames it when complete, so a crash mid-save
leaves no half-written step behind; the last `keep` steps are kept. A step that is there but cannot
be read (a truncated or deleted file) is moved aside to `<dir>/../corrupt_checkpoints/` with a
warning, and the previous one is restored instead.

`PreemptionGuard` turns SIGTERM (the notice a preemptible TPU or a cluster scheduler sends) into a
flag the training loop polls between steps, so it can save and exit cleanly.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE, DATA = "state", "data"


class DataPosition:
  """A frozen Grain iterator position, saved in the iterator's own checkpoint format.

  Saving a snapshot instead of the live iterator pins the position to the step being saved even
  when the iterator has moved on (asynchronous saves, or a rewind after a non-finite step).
  """

  def __init__(self, state: dict):
    self._state = state

  def get_state(self) -> bytes:
    # Grain's handler stores a non-DatasetIterator's state as text decoded from these bytes, and
    # restores a DatasetIterator from that text with json.loads: the same file either way.
    return json.dumps(self._state, indent=4).encode()


class Checkpointer:
  """An Orbax `CheckpointManager` for the two items, with restore-with-fallback.

  Args:
    directory: where step directories go (local path or a `gs://` URL).
    save_every: periodic saves at multiples of this step (a `FixedIntervalPolicy`); `save(...,
      force=True)` saves at any step (end of training, SIGTERM, non-finite loss).
    keep: how many of the latest checkpoints to keep (a `LatestN` preservation policy).
    async_save: write in a background thread after the arrays are copied to host memory.
  """

  def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(save_every),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA))

  @property
  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """True when the periodic policy wants a checkpoint at `step` (no device sync involved)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_position: dict, *, force: bool = False) -> bool:
    """Saves `state` and the Grain iterator position `data_position` (its `get_state()`)."""
    if step in self.steps:
      return False
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: grain.checkpoint.CheckpointSave(DataPosition(data_position)),
    })
    return self._manager.save(step, args=args, force=force)

  def restore_latest(self, abstract_state: Any, data_iterator) -> Optional[tuple[Any, int]]:
    """Restores the newest readable checkpoint; returns (state, step) or None if there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (`jax.eval_shape` of the
    initialiser plus the train state's shardings). `data_iterator` is set to the saved position.
    Unreadable steps are moved aside with a warning and the previous one is tried.
    """
    initial_position = data_iterator.get_state()
    for step in sorted(self.steps, reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: grain.checkpoint.CheckpointRestore(data_iterator),
        }))
        state = restored[STATE]
        _check_structure(state, abstract_state)
        return state, step
      except Exception as error:  # noqa: BLE001 - any failure to read means: try the previous one
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); falling back to the "
                        "previous checkpoint", step, self.directory, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "")
        self._move_aside(step)
        data_iterator.set_state(initial_position)
    return None

  def _move_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's directory, keeping it for inspection."""
    if jax.process_index() == 0:
      target = self.directory.parent / "corrupt_checkpoints"
      target.mkdir(parents=True, exist_ok=True)
      destination = target / f"{step}"
      suffix = 0
      while destination.exists():
        suffix += 1
        destination = target / f"{step}.{suffix}"
      (self.directory / str(step)).rename(destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"sleep_jax_checkpoint_move_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until background writes are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_structure(state, abstract_state) -> None:
  leaves, expected = jax.tree.leaves(state), jax.tree.leaves(abstract_state)
  if len(leaves) != len(expected):
    raise ValueError(f"restored {len(leaves)} arrays, expected {len(expected)}")
  for got, want in zip(leaves, expected):
    if got.shape != want.shape or got.dtype != want.dtype:
      raise ValueError(f"restored an array {got.dtype}{list(got.shape)} where "
                       f"{want.dtype}{list(want.shape)} was expected")


class PreemptionGuard:
  """Notices SIGTERM between training steps.

  With one process, a SIGTERM handler sets a flag (the default action, exiting at once, would lose
  the steps since the last checkpoint). With several processes, JAX's coordination service already
  listens for the signal, and `reached` asks it, so every process stops at the same step.
  Use as a context manager; the previous handler is put back on exit.
  """

  def __init__(self):
    self._received = threading.Event()
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionGuard":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._received.set()

  def reached(self, step: int) -> bool:
    """True once a SIGTERM has arrived (all processes agree on the step when there are several)."""
    if jax.process_count() > 1:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._received.is_set()
