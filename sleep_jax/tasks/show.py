"""Prints one example of a task as text, windows marked and supervised answers highlighted.

    python -m sleep_jax.tasks.show --task=cellular_automaton --index=3
    python -m sleep_jax.tasks.show --task=multi_hop --split=train --index=12345
    python -m sleep_jax.tasks.show --task=math --scale=small --index=7

Task parameters are flags (``--t=8``, ``--scale=paper``, ``--window=512``). For math problems the
output ends with the question's dependency chain as the verifying solver reads it.
"""

from __future__ import annotations

import sys

from absl import app, flags

from sleep_jax.tasks import cli

cli.define_task_flags()
flags.DEFINE_integer("index", 0, "example index within the split")
flags.DEFINE_enum("split", "test", ["train", "test"], "which split")
flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "highlight with ANSI colours")
flags.DEFINE_integer("columns", None, "line width (default: the terminal's, at most 120)")
flags.mark_flag_as_required("task")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    task = cli.task_from_flags()
    example = task.example(FLAGS.split, FLAGS.index)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  color = FLAGS.color == "always" or (FLAGS.color == "auto" and sys.stdout.isatty())
  print(task.describe(example, color=color, width=FLAGS.columns))


if __name__ == "__main__":
  app.run(main)
