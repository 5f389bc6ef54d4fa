"""Procedural tasks: the Rule 110 cellular automaton, multi-hop retrieval and math word problems.

``get(name, **params)`` builds a task; every task shares the interface of ``base.Task``: a static
window layout (``window``, ``seq_len``, ``consolidation_windows``), random-access examples
(``example(split, index)``, ``examples(split, indices)``) and ``evaluate`` with metrics per
difficulty group. This package depends on numpy only (Grain and TFDS are imported where used).
"""

from __future__ import annotations

import dataclasses

from sleep_jax.tasks.base import PAD, Task
from sleep_jax.tasks.cellular_automaton import CellularAutomaton
from sleep_jax.tasks.math_problems import MathProblems
from sleep_jax.tasks.multi_hop import MultiHop

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (CellularAutomaton, MultiHop, MathProblems)}


def get(name: str, **params) -> Task:
  """Builds task ``name`` ("cellular_automaton", "multi_hop" or "math") with its parameters.

  Raises ValueError for an unknown name, an unknown parameter or a value out of range.
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid names: {sorted(TASKS)}")
  cls = TASKS[name]
  valid = [f.name for f in dataclasses.fields(cls) if f.init]
  unknown = sorted(set(params) - set(valid))
  if unknown:
    raise ValueError(f"{name} has no parameter(s) {unknown}; valid parameters: {valid}")
  return cls(**params)


def names() -> list[str]:
  """The registered task names."""
  return sorted(TASKS)


__all__ = ["PAD", "TASKS", "Task", "CellularAutomaton", "MultiHop", "MathProblems", "get", "names"]
