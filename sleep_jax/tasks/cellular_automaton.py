"""Rule 110 cellular automaton recall-with-computation (the paper's sections 4 and 6.1).

``states`` independent random binary states of ``width`` cells (cyclic boundary) are shown one per
window, then ``states`` query tokens ``Q0 Q1 ...`` in the prediction window. The target at ``Qi``
is cell 0 of state i after ``t`` Rule 110 steps, so every label is a function of consolidated
context only. With the defaults (width 24, 4 states, window 24) the content is 96 + 4 = 100 tokens,
padded at the end to T = 120 (5 windows).

States are packed in unsigned integers (cell j = bit j) and evolved for a whole batch at once with
bit operations: Rule 110 maps a neighbourhood (left, centre, right) to
``(centre OR right) AND NOT (left AND centre AND right)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sleep_jax.tasks import base, randomness

MAX_STATES = 16  # the vocabulary always holds Q0..Q15, so it does not change with `states`


def rule110_packed(cells: np.ndarray, width: int, steps: int) -> np.ndarray:
  """Evolves bit-packed cyclic states ``steps`` times: uint64 [...] -> uint64 [...].

  With left, centre and right neighbours L, C, R, Rule 110 is ``(C XOR R) OR (C AND NOT L)``.
  """
  mask = np.uint64((1 << width) - 1)
  x = np.asarray(cells, np.uint64) & mask
  left, right, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)
  if width <= 32:
    # Two copies side by side (cell j at bits j and j + width) turn both cyclic neighbours into
    # plain shifts: bit j of y >> (width - 1) is cell j - 1, bit j of y >> 1 is cell j + 1.
    w, back, one = np.uint64(width), np.uint64(width - 1), np.uint64(1)
    for _ in range(steps):
      np.bitwise_or(x, np.left_shift(x, w, out=tmp), out=tmp)
      np.right_shift(tmp, back, out=left)
      np.right_shift(tmp, one, out=right)
      np.bitwise_xor(x, right, out=right)  # C XOR R (with stray high bits, masked below)
      np.bitwise_and(x, np.invert(left, out=left), out=left)  # C AND NOT L
      np.bitwise_or(right, left, out=x)
      np.bitwise_and(x, mask, out=x)
    return x
  one, back = np.uint64(1), np.uint64(width - 1)
  for _ in range(steps):  # widths up to 64: rotate within the word
    np.bitwise_or(np.left_shift(x, one, out=left), np.right_shift(x, back, out=tmp), out=left)
    np.bitwise_or(np.right_shift(x, one, out=right), np.left_shift(x, back, out=tmp), out=right)
    np.bitwise_xor(x, right, out=right)
    np.bitwise_and(x, np.invert(left, out=left), out=left)
    np.bitwise_or(right, left, out=x)
    np.bitwise_and(x, mask, out=x)
  return x


@dataclasses.dataclass(frozen=True)
class CellularAutomaton(base.Task):
  """Rule 110 task. Groups: the single value ``t``; chance: 0.5 per label, 2**-states exact."""

  name = "cellular_automaton"
  group_name = "t"

  t: int = dataclasses.field(default=32, metadata={"doc": "Rule 110 steps (reasoning depth)"})
  width: int = dataclasses.field(default=24, metadata={"doc": "cells per state (cyclic)"})
  states: int = dataclasses.field(default=4, metadata={"doc": "independent states (= labels)"})
  window: int = dataclasses.field(default=24, metadata={"doc": "window length L"})
  num_test: int = dataclasses.field(default=1000, metadata={"doc": "test split size"})

  def __post_init__(self):
    task = self.name
    base.check_int(task, "t", self.t, 0, 4096)
    base.check_int(task, "width", self.width, 3, 64)
    base.check_int(task, "states", self.states, 1, MAX_STATES)
    base.check_int(task, "window", self.window, self.states, 4096)
    base.check_int(task, "num_test", self.num_test, 1, 10**7)
    cells = self.states * self.width
    # The states fill whole windows (left-padded when they do not divide evenly), then one
    # prediction window holds the queries followed by padding.
    context = -(-cells // self.window) * self.window
    object.__setattr__(self, "_context_len", context)
    self._set_layout(
        vocab=[base.PAD, "0", "1"] + [f"Q{i}" for i in range(MAX_STATES)],
        seq_len=context + self.window,
        consolidation_windows=[True] * (context // self.window) + [False],
        groups=[self.t],
        chance={"accuracy": 0.5, "exact": 0.5**self.states},
    )

  def _generate(self, split, indices, keys):
    b, n, w = len(keys), self.states, self.width
    initial = randomness.draws(keys, 0, n) & np.uint64((1 << w) - 1)  # uint64 [b n]
    labels = (rule110_packed(initial, w, self.t) & np.uint64(1)).astype(np.int32)  # [b n]
    cells = (initial[:, :, None] >> np.arange(w, dtype=np.uint64)) & np.uint64(1)  # [b n w]
    batch = self.empty_batch(b)
    zero, query0 = self.token_id("0"), self.token_id("Q0")
    start = self._context_len - n * w
    batch["tokens"][:, start:self._context_len] = cells.reshape(b, n * w).astype(np.int32) + zero
    queries = slice(self._context_len, self._context_len + n)
    batch["tokens"][:, queries] = query0 + np.arange(n, dtype=np.int32)
    batch["targets"][:, queries] = labels + zero
    batch["loss_mask"][:, queries] = True
    batch["group"] = np.full(b, self.t, np.int32)
    return batch

  def layout_window(self, tokens, width):
    # A state per window reads best as one unbroken row of cells.
    cells = [t for t in tokens if t in ("0", "1")]
    if len(cells) == len(tokens):
      return ["".join("█" if c == "1" else "·" for c in cells)]
    return super().layout_window(tokens, width)

  def explain(self, example: dict[str, Any]) -> list[str]:
    start = self._context_len - self.states * self.width
    cells = np.asarray(example["tokens"][start:self._context_len]) - self.token_id("0")
    lines = [f"each state after t={self.t} Rule 110 steps (cyclic); the label is cell 0:"]
    for i in range(self.states):
      row = cells[i * self.width:(i + 1) * self.width].astype(np.uint64)
      packed = int((row << np.arange(self.width, dtype=np.uint64)).sum())
      final = int(rule110_packed(np.array([packed], np.uint64), self.width, self.t)[0])
      text = "".join("█" if (final >> j) & 1 else "·" for j in range(self.width))
      lines.append(f"  Q{i}: {text}  -> label {final & 1}")
    return lines
