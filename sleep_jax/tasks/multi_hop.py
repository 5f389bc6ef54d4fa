"""Multi-hop retrieval on a directed cycle ("Depo", Physics of Language Models 4.1).

Context: a directed cycle over ``num_nodes`` distinct node names drawn from a pool of 75, written
as its edges in random order, 4 tokens each (``src -> dst ,``), left-padded with ``<pad>`` to
300 tokens (4 windows of L = 75). Then ``num_queries`` query-answer pairs of 6 tokens,
``? k start = answer ;`` (the prediction window): the answer is the node reached from ``start``
after ``k`` edges. The content is 360 tokens, padded at the end to T = 375 (5 windows).

Supervision: the target at each ``=`` is the answer node (the model predicts it there); the answer
token then appears as the next input, and its own position is not supervised.

Hop counts: a training example draws each query's k uniformly from ``train_hops``; test example i
uses one k for all its queries, ``eval_hops[i % len(eval_hops)]``, so the test split is balanced
over the evaluation hops and an example's group is that k. Training examples mix hops: their
group is 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sleep_jax.tasks import base, randomness

NODE_POOL = 75  # node names n00..n74; the edge section always has room for 75 edges
MAX_HOP = 32  # hop tokens 1..32 are always in the vocabulary
EDGE_TOKENS, QUERY_TOKENS = 4, 6


@dataclasses.dataclass(frozen=True)
class MultiHop(base.Task):
  """Depo multi-hop task. Groups: ``eval_hops``; chance accuracy 1 / num_nodes."""

  name = "multi_hop"
  group_name = "k"

  num_nodes: int = dataclasses.field(default=75, metadata={"doc": "nodes in the cycle (2..75)"})
  train_hops: tuple[int, int] = dataclasses.field(
      default=(1, 16), metadata={"kind": "tuple", "doc": "training hop range (low, high)"})
  eval_hops: tuple[int, ...] = dataclasses.field(
      default=(1, 2, 4, 8, 16), metadata={"kind": "tuple", "doc": "test hop counts"})
  num_queries: int = dataclasses.field(default=10, metadata={"doc": "queries per example"})
  window: int = dataclasses.field(default=75, metadata={"doc": "window length L"})
  num_test: int = dataclasses.field(default=1000, metadata={"doc": "test split size"})

  def __post_init__(self):
    task = self.name
    base.check_int(task, "num_nodes", self.num_nodes, 2, NODE_POOL)
    set_ = object.__setattr__  # normalise lists given on the command line or in configs
    set_(self, "train_hops", base.check_int_tuple(task, "train_hops", self.train_hops, 1, MAX_HOP,
                                                  length=2, ordered=True))
    set_(self, "eval_hops", base.check_int_tuple(task, "eval_hops", self.eval_hops, 1, MAX_HOP))
    base.check_int(task, "num_queries", self.num_queries, 1, 64)
    base.check_int(task, "window", self.window, QUERY_TOKENS * self.num_queries, 4096)
    base.check_int(task, "num_test", self.num_test, 1, 10**7)
    # Edges are left-padded to the room of the full pool (300 tokens), rounded up to windows.
    context = -(-EDGE_TOKENS * NODE_POOL // self.window) * self.window
    set_(self, "_context_len", context)
    self._set_layout(
        vocab=[base.PAD, "->", ",", "?", "=", ";"]
        + [f"n{i:02d}" for i in range(NODE_POOL)]
        + [str(k) for k in range(1, MAX_HOP + 1)],
        seq_len=context + self.window,
        consolidation_windows=[True] * (context // self.window) + [False],
        groups=sorted(set(self.eval_hops)),
        chance={"accuracy": 1.0 / self.num_nodes, "exact": self.num_nodes ** -self.num_queries},
    )

  def _generate(self, split, indices, keys):
    b, n, q = len(keys), self.num_nodes, self.num_queries
    node0, hop0 = self.token_id("n00"), self.token_id("1")
    # The first n names of a random ordering of the pool, in cycle order: cycle[j] -> cycle[j+1].
    order = np.argsort(randomness.draws(keys, 0, NODE_POOL), axis=1, kind="stable")
    cycle = order[:, :n]  # [b n] node numbers
    edge_order = np.argsort(randomness.draws(keys, 1, n), axis=1, kind="stable")  # [b n]
    src = np.take_along_axis(cycle, edge_order, axis=1)
    dst = np.take_along_axis(cycle, (edge_order + 1) % n, axis=1)
    edges = np.stack([src + node0, np.full_like(src, self.token_id("->")), dst + node0,
                      np.full_like(src, self.token_id(","))], axis=2).reshape(b, EDGE_TOKENS * n)

    query_draws = randomness.draws(keys, 2, 2 * q)
    start_pos = randomness.below(query_draws[:, :q], n)  # positions on the cycle [b q]
    if split == "test":
      hops = np.asarray(self.eval_hops)[indices % len(self.eval_hops)]
      hops = np.repeat(hops[:, None], q, axis=1)
      group = hops[:, 0]
    else:
      low, high = self.train_hops
      hops = low + randomness.below(query_draws[:, q:], high - low + 1)
      group = np.zeros(b, np.int64)
    start = np.take_along_axis(cycle, start_pos, axis=1)
    answer = np.take_along_axis(cycle, (start_pos + hops) % n, axis=1)
    queries = np.stack([np.full_like(start, self.token_id("?")), hops - 1 + hop0, start + node0,
                        np.full_like(start, self.token_id("=")), answer + node0,
                        np.full_like(start, self.token_id(";"))], axis=2).reshape(b, QUERY_TOKENS * q)

    batch = self.empty_batch(b)
    c = self._context_len
    batch["tokens"][:, c - EDGE_TOKENS * n:c] = edges
    batch["tokens"][:, c:c + QUERY_TOKENS * q] = queries
    equals = c + QUERY_TOKENS * np.arange(q) + 3
    batch["targets"][:, equals] = answer + node0
    batch["loss_mask"][:, equals] = True
    batch["group"] = group.astype(np.int32)
    return batch

  def layout_window(self, tokens, width):
    # One edge or one query per cell, aligned in columns.
    text = base.collapse_pads(tokens)
    lines, chunk = [], []
    for tok in text:
      chunk.append(tok)
      if tok in (",", ";") or tok.startswith(base.PAD):
        lines.append(" ".join(chunk))
        chunk = []
    if chunk:
      lines.append(" ".join(chunk))
    cell = max(len(s) for s in lines) + 2
    per_line = max(1, width // cell)
    return ["".join(s.ljust(cell) for s in lines[i:i + per_line]).rstrip()
            for i in range(0, len(lines), per_line)]

  def explain(self, example: dict[str, Any]) -> list[str]:
    words = self.decode(example["tokens"])
    successor = {}
    for i in range(0, self._context_len, EDGE_TOKENS):
      if words[i + 1] == "->":
        successor[words[i]] = words[i + 2]
    lines = ["walks along the cycle:"]
    c = self._context_len
    for j in range(self.num_queries):
      _, hop, start, _, answer, _ = words[c + QUERY_TOKENS * j:c + QUERY_TOKENS * (j + 1)]
      path = [start]
      for _ in range(int(hop)):
        path.append(successor[path[-1]])
      lines.append(f"  k={hop:>2}: " + " -> ".join(path))
    return lines
