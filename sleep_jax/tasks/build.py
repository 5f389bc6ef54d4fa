"""Builds the fixed test splits as TFDS datasets (ArrayRecord), so every run evaluates the same bytes.

    python -m sleep_jax.tasks.build --task=multi_hop --out=DATA_DIR
    python -m sleep_jax.tasks.build --task=math --scale=paper --window=512 --out=DATA_DIR
    python -m sleep_jax.tasks.build --task=all --out=DATA_DIR   # every split the paper's runs use

Then evaluate with ``task.evaluate(score_fn, data_dir=DATA_DIR)`` or
``sleep_jax.data.eval_batches(task, batch_size, data_dir=DATA_DIR)``. A split already complete in
``DATA_DIR`` is left as it is.
"""

from __future__ import annotations

import time

from absl import app, flags

from sleep_jax import tasks
from sleep_jax.tasks import cli, storage

cli.define_task_flags()
flags.DEFINE_string("out", None, "data directory to write to")
flags.mark_flag_as_required("out")
flags.mark_flag_as_required("task")
FLAGS = flags.FLAGS

# The evaluation splits of the paper's experiments (SPEC section 6).
PAPER_SPLITS = (
    [("cellular_automaton", {"t": t}) for t in (4, 8, 10, 12, 14, 16, 32)]
    + [("multi_hop", {})]
    + [("math", {"scale": s}) for s in ("tiny", "small", "paper")]
    + [("math", {"scale": "paper", "window": 512})]
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.task == "all":
    todo = [tasks.get(name, **params) for name, params in PAPER_SPLITS]
  else:
    try:
      todo = [cli.task_from_flags()]
    except ValueError as error:
      raise app.UsageError(str(error)) from None
  for task in todo:
    start = time.time()
    path = storage.build(task, FLAGS.out, quiet=True)
    print(f"{task.name}: {task.num_test} test examples in {path} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
  app.run(main)
