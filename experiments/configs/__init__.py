"""Experiment configs: one Python config file per task, presets `smoke`, `small`, `paper`.

    python -m experiments.train --config=experiments/configs/<task>.py:<preset>[,<variant>] --workdir=DIR

`get(task, arg)` loads the same configs in-process (for sweeps and notebooks).
"""

from __future__ import annotations

import importlib

from ml_collections import config_dict

TASK_CONFIGS = {"cellular_automaton": "cellular_automaton", "multi_hop": "multi_hop", "math": "math"}


def get(task: str, arg: str | None = None) -> config_dict.ConfigDict:
  """The config of `task` for `arg` ("<preset>[,<variant>]"), unlocked."""
  if task not in TASK_CONFIGS:
    raise ValueError(f"unknown task {task!r}; config files exist for {sorted(TASK_CONFIGS)}")
  module = importlib.import_module(f"experiments.configs.{TASK_CONFIGS[task]}")
  return module.get_config(arg)
