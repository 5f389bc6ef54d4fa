"""Grain input pipelines: infinite, deterministic training streams and padded evaluation batches.

Training data is generated on the fly. Global batch ``s`` holds the examples at positions
``s * G ... s * G + G - 1`` of a seeded permutation of the task's train indices (``G`` the global
batch size), and process ``p`` of ``P`` takes the ``p``-th contiguous slice of ``G / P`` rows. So
the union of all processes' batches does not depend on the process count, and the pipeline's whole
state is the next step number: ``grain`` iterators save and restore it with ``get_state`` /
``set_state``, or inside an Orbax checkpoint with ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore`` (see ``docs/tasks.md``).

Evaluation reads a split built by ``python -m sleep_jax.tasks.build`` when ``data_dir`` is given
(byte-identical data for every experiment) and otherwise generates the same examples.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from sleep_jax.tasks import base, randomness
from sleep_jax.tasks.base import Task

TRAIN_KEYS = ("tokens", "targets", "loss_mask")
_EVAL_KEYS = TRAIN_KEYS + ("group", "index")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only to learn the topology; the pipeline itself is numpy

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  base.check_int("data", "process_count", process_count, 1, 1 << 20)
  base.check_int("data", "process_index", process_index, 0, process_count - 1)
  return int(process_index), int(process_count)


def train_indices(global_batch_size: int, seed: int, step: int) -> np.ndarray:
  """The train example indices of global batch ``step``: int64 [G].

  Positions run through a seeded permutation of [0, 2**40), re-keyed for each pass over it.
  """
  size = np.uint64(1 << base.TRAIN_INDEX_BITS)
  positions = np.uint64(step) * np.uint64(global_batch_size) + np.arange(global_batch_size, dtype=np.uint64)
  epochs, within = positions // size, positions % size
  # A new permutation for every pass over the 2**40 indices (a batch may straddle two passes).
  epoch_seeds = randomness.mix64(randomness.mix64(np.array([seed], np.uint64)) + epochs)
  return randomness.permute_index(within, epoch_seeds, base.TRAIN_INDEX_BITS)


class TrainBatches:
  """Random-access source of one process's training batches: element ``s`` is step ``s``."""

  def __init__(self, task: Task, global_batch_size: int, seed: int, process_index: int,
               process_count: int):
    self.task, self.global_batch_size, self.seed = task, global_batch_size, seed
    self.local_batch_size = global_batch_size // process_count
    self.offset = process_index * self.local_batch_size

  def __len__(self) -> int:
    return (1 << 62) // self.global_batch_size  # unbounded for any run

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    indices = train_indices(self.global_batch_size, self.seed, int(step))
    batch = self.task.examples("train", indices[self.offset:self.offset + self.local_batch_size])
    return {k: batch[k] for k in TRAIN_KEYS}

  def __repr__(self) -> str:
    return (f"TrainBatches({self.task!r}, global_batch_size={self.global_batch_size}, "
            f"seed={self.seed}, rows={self.offset}:{self.offset + self.local_batch_size})")


def train_dataset(task: Task, global_batch_size: int, seed: int, *, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """This process's training batches as a Grain ``MapDataset`` (element s = step s).

  Each element is ``{"tokens", "targets", "loss_mask"}``, numpy [G / P, T]. ``process_index``
  and ``process_count`` default to ``jax.process_index()`` and ``jax.process_count()``.
  """
  process_index, process_count = _process(process_index, process_count)
  base.check_int("data", "seed", seed, 0, (1 << 63) - 1)
  base.check_int("data", "global_batch_size", global_batch_size, 1, 1 << 24)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size must be a multiple of process_count ({process_count}), "
                     f"got {global_batch_size}")
  return grain.MapDataset.source(
      TrainBatches(task, global_batch_size, seed, process_index, process_count))


def make_train_iterator(task: Task, global_batch_size: int, seed: int, *,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0, prefetch: int = 2,
                        start_step: int = 0) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator over this process's training batches.

  ``worker_count`` > 0 generates in that many worker processes (``mp_prefetch``), otherwise one
  background thread prefetches ``prefetch`` batches. The batches are the same either way.
  ``get_state()`` / ``set_state()`` resume at exactly the next batch (the state's format depends
  on ``worker_count``: restore with the same value); ``start_step`` starts at a given step, so a
  data position can also be restored from the step number alone.
  """
  base.check_int("data", "worker_count", worker_count, 0, 1024)
  base.check_int("data", "prefetch", prefetch, 1, 1024)
  base.check_int("data", "start_step", start_step, 0, 1 << 40)
  dataset = train_dataset(task, global_batch_size, seed, process_index=process_index,
                          process_count=process_count)
  if start_step:
    dataset = dataset[start_step:]
  stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if worker_count:
    from absl import flags

    if not flags.FLAGS.is_parsed():
      # Grain's workers read its absl flags; outside an absl app keep their defaults.
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  return iter(stream)


class EvalBatches:
  """Random-access source of padded evaluation batches over a contiguous range of examples.

  Element b: ``tokens``, ``targets``, ``loss_mask`` [B T], ``group`` int32 [B], ``index``
  int64 [B] and ``valid`` bool [B] (False on padding rows, whose loss mask is empty).
  """

  def __init__(self, task: Task, batch_size: int, split: str, start: int, stop: int,
               num_batches: int, stored=None):
    self.task, self.batch_size, self.split = task, batch_size, split
    self.start, self.stop, self.num_batches, self.stored = start, stop, num_batches, stored

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    lo = min(self.stop, self.start + int(b) * self.batch_size)
    hi = min(self.stop, lo + self.batch_size)
    indices = np.arange(lo, hi)
    batch = self.task.empty_batch(self.batch_size)
    batch["group"] = np.zeros(self.batch_size, np.int32)
    batch["index"] = np.full(self.batch_size, -1, np.int64)
    batch["valid"] = np.arange(self.batch_size) < len(indices)
    if not len(indices):  # a process whose share of a small split is empty
      return batch
    if self.stored is not None:
      records = self.stored.__getitems__(indices.tolist())
      rows = {k: np.stack([np.asarray(r[k]) for r in records]) for k in _EVAL_KEYS}
    else:
      rows = self.task.examples(self.split, indices)
    for key in _EVAL_KEYS:
      batch[key][:len(indices)] = rows[key]
    return batch


def eval_dataset(task: Task, batch_size: int, *, split: str = "test", num_examples: int | None = None,
                 data_dir: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Evaluation batches as a Grain ``MapDataset`` (see ``EvalBatches`` for the keys).

  The first ``num_examples`` examples of ``split`` (all of the test split by default) are cut
  into ``process_count`` contiguous parts; every process gets the same number of batches, the
  last ones padded, so multi-host evaluation stays in step.
  """
  process_index, process_count = _process(process_index, process_count)
  base.check_int("data", "batch_size", batch_size, 1, 1 << 24)
  size = task.split_size(split)
  if num_examples is None:
    if split != "test":
      raise ValueError("num_examples must be given for the unbounded train split")
    num_examples = size
  base.check_int("data", "num_examples", num_examples, 1, size)
  stored = None
  if data_dir is not None:
    from sleep_jax.tasks import storage

    stored = storage.load_split(task, split, data_dir)
    base.check_int("data", "num_examples", num_examples, 1, len(stored))
  per_process = -(-num_examples // process_count)
  start = min(num_examples, process_index * per_process)
  stop = min(num_examples, start + per_process)
  num_batches = -(-per_process // batch_size)
  return grain.MapDataset.source(
      EvalBatches(task, batch_size, split, start, stop, num_batches, stored))


def eval_batches(task: Task, batch_size: int, split: str = "test", num_examples: int | None = None,
                 data_dir: str | None = None, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Iterates the batches of ``eval_dataset`` in order."""
  dataset = eval_dataset(task, batch_size, split=split, num_examples=num_examples, data_dir=data_dir,
                         process_index=process_index, process_count=process_count)
  for b in range(len(dataset)):
    yield dataset[b]
