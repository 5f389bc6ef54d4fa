"""Command-line flags for task parameters, shared by ``build``, ``show`` and the benchmarks.

Every parameter of every task is a string flag (``--t=32``, ``--eval_hops=1,2,4``,
``--scale=paper``); flags left unset keep the task's defaults, and setting a flag the chosen task
does not have is an error.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from sleep_jax import tasks
from sleep_jax.tasks import base


def _all_params() -> dict[str, str]:
  docs: dict[str, list[str]] = {}
  for name, cls in sorted(tasks.TASKS.items()):
    for field in dataclasses.fields(cls):
      if field.init:
        docs.setdefault(field.name, []).append(f"{name}: {field.metadata.get('doc', '')}")
  return {k: "; ".join(v) for k, v in docs.items()}


def define_task_flags() -> None:
  """Defines ``--task`` and one flag per task parameter (call once, at import of an entry point)."""
  flags.DEFINE_string("task", None, f"task name, one of {tasks.names()}")
  for param, doc in _all_params().items():
    flags.DEFINE_string(param, None, f"task parameter ({doc})")


def task_from_flags(name: str | None = None) -> base.Task:
  """Builds the task named by ``--task`` (or ``name``) with the parameter flags that are set."""
  values = flags.FLAGS
  name = name or values.task
  if name not in tasks.TASKS:
    raise ValueError(f"--task must be one of {tasks.names()}, got {name!r}")
  cls = tasks.TASKS[name]
  valid = {f.name for f in dataclasses.fields(cls) if f.init}
  params = {}
  for param in _all_params():
    text = getattr(values, param)
    if text is None:
      continue
    if param not in valid:
      raise ValueError(f"--{param} is not a parameter of {name}; its parameters: {sorted(valid)}")
    params[param] = base.parse_param(cls, param, text)
  return tasks.get(name, **params)
