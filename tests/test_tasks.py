"""Tests of the task interface, the Rule 110 task and the multi-hop task.

The checkers here read examples through the vocabulary strings only and recompute every label
with their own Rule 110 simulation and graph walk.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sleep_jax import tasks

SMALL_TASKS = [
    ("cellular_automaton", {}),
    ("cellular_automaton", {"t": 0, "width": 5, "states": 3, "window": 7}),
    ("multi_hop", {}),
    ("multi_hop", {"num_nodes": 7, "num_queries": 4, "window": 40}),
    ("math", {"scale": "tiny"}),
]


def words(task, row):
  return [task.vocab[i] for i in row]


# ----- independent references ---------------------------------------------------------------


def rule110_reference(cells, steps):
  """Rule 110 on a cyclic list of 0/1 cells: new cell = bit (4 l + 2 c + r) of the number 110."""
  n = len(cells)
  for _ in range(steps):
    cells = [(110 >> (4 * cells[j - 1] + 2 * cells[j] + cells[(j + 1) % n])) & 1 for j in range(n)]
  return cells


def check_cellular_automaton(task, example):
  t, width, states, window = task.t, task.width, task.states, task.window
  tokens = words(task, example["tokens"])
  query_start = (task.num_windows - 1) * window  # the last window holds the queries
  cells = tokens[query_start - states * width:query_start]
  assert set(tokens[:query_start - states * width]) <= {"<pad>"}
  assert set(cells) <= {"0", "1"}
  queries = tokens[query_start:query_start + states]
  assert queries == [f"Q{i}" for i in range(states)]
  assert set(tokens[query_start + states:]) <= {"<pad>"}
  expected_mask = np.zeros(task.seq_len, bool)
  expected_mask[query_start:query_start + states] = True
  np.testing.assert_array_equal(example["loss_mask"], expected_mask)
  for i in range(states):
    state = [int(c) for c in cells[i * width:(i + 1) * width]]
    label = rule110_reference(state, t)[0]
    assert task.vocab[example["targets"][query_start + i]] == str(label)
  assert example["group"] == t


def check_multi_hop(task, example, split):
  tokens = words(task, example["tokens"])
  edge_area = -(-300 // task.window) * task.window  # 75 edges of 4 tokens, whole windows
  edges_text = [t for t in tokens[:edge_area] if t != "<pad>"]
  assert tokens[:edge_area - len(edges_text)] == ["<pad>"] * (edge_area - len(edges_text))
  successor = {}
  for j in range(0, len(edges_text), 4):
    src, arrow, dst, comma = edges_text[j:j + 4]
    assert (arrow, comma) == ("->", ",") and src not in successor
    successor[src] = dst
  assert len(successor) == task.num_nodes
  # A single directed cycle through every node.
  node, seen = next(iter(successor)), set()
  while node not in seen:
    seen.add(node)
    node = successor[node]
  assert seen == set(successor) == set(successor.values())

  mask_positions, hops = [], []
  for q in range(task.num_queries):
    at = edge_area + 6 * q
    mark, hop, start, equals, answer, end = tokens[at:at + 6]
    assert (mark, equals, end) == ("?", "=", ";")
    walk = start
    for _ in range(int(hop)):
      walk = successor[walk]
    assert answer == walk and task.vocab[example["targets"][at + 3]] == walk
    mask_positions.append(at + 3)
    hops.append(int(hop))
  assert set(tokens[edge_area + 6 * task.num_queries:]) <= {"<pad>"}
  expected_mask = np.zeros(task.seq_len, bool)
  expected_mask[mask_positions] = True
  np.testing.assert_array_equal(example["loss_mask"], expected_mask)
  if split == "test":
    k = task.eval_hops[example["index"] % len(task.eval_hops)]
    assert hops == [k] * task.num_queries and example["group"] == k
  else:
    low, high = task.train_hops
    assert all(low <= k <= high for k in hops) and example["group"] == 0
  return hops


# ----- the tasks against the references -----------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"t": 0}, {"t": 7, "width": 5, "states": 3, "window": 7},
                                    {"t": 40, "width": 64, "states": 2, "window": 64}])
def test_cellular_automaton_labels_follow_rule_110(params):
  task = tasks.get("cellular_automaton", **params)
  for split in ("test", "train"):
    indices = np.arange(40) * (7919 if split == "train" else 23)
    batch = task.examples(split, indices)
    for row in range(40):
      check_cellular_automaton(task, {k: v[row] for k, v in batch.items()})


def test_cellular_automaton_default_layout_matches_the_paper():
  task = tasks.get("cellular_automaton")
  assert (task.window, task.seq_len, task.num_windows) == (24, 120, 5)
  assert task.consolidation_windows == (True, True, True, True, False)
  assert task.groups == [32] and task.group_name == "t"
  assert task.chance == {"accuracy": 0.5, "exact": 1 / 16}
  # Initial cells are fair coin flips. (Labels are not: Rule 110 drifts towards a density of
  # about 0.56, so always answering 1 beats the uniform chance level.)
  batch = task.examples("train", np.arange(2000))
  cells = batch["tokens"][:, :96] - task.vocab.index("0")
  assert abs(cells.mean() - 0.5) < 0.01
  assert abs(np.corrcoef(cells[:, :-1].ravel(), cells[:, 1:].ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("params", [{}, {"num_nodes": 7, "num_queries": 4, "window": 40},
                                    {"num_nodes": 2, "train_hops": (3, 5), "eval_hops": (32,)}])
def test_multi_hop_answers_follow_the_graph(params):
  task = tasks.get("multi_hop", **params)
  for split in ("test", "train"):
    indices = np.arange(30) * (104729 if split == "train" else 31)
    batch = task.examples(split, indices)
    for row in range(30):
      check_multi_hop(task, {k: v[row] for k, v in batch.items()}, split)


def test_multi_hop_default_layout_and_hop_distribution():
  task = tasks.get("multi_hop")
  assert (task.window, task.seq_len, task.num_windows) == (75, 375, 5)
  assert task.consolidation_windows == (True,) * 4 + (False,)
  assert task.groups == [1, 2, 4, 8, 16] and task.group_name == "k"
  train = task.examples("train", np.arange(300))
  hops = [check_multi_hop(task, {k: v[r] for k, v in train.items()}, "train") for r in range(300)]
  counts = np.bincount(np.ravel(hops), minlength=17)[1:]
  assert counts.min() > 0.6 * counts.mean()  # each k in 1..16 drawn about equally often
  test_groups = task.examples("test", np.arange(1000))["group"]
  assert {k: int((test_groups == k).sum()) for k in task.groups} == {k: 200 for k in task.groups}


# ----- interface and invariants shared by every task ----------------------------------------


@pytest.mark.parametrize("name,params", SMALL_TASKS)
def test_layout_invariants(name, params):
  task = tasks.get(name, **params)
  assert task.vocab[0] == "<pad>" and len(set(task.vocab)) == len(task.vocab)
  assert task.seq_len % task.window == 0 and task.num_windows == task.seq_len // task.window
  assert len(task.consolidation_windows) == task.num_windows
  assert task.consolidation_windows[0] and not task.consolidation_windows[-1]
  for split in ("test", "train"):
    batch = task.examples(split, np.arange(64))
    assert batch["tokens"].shape == batch["targets"].shape == (64, task.seq_len)
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == bool and batch["loss_mask"].shape == (64, task.seq_len)
    assert batch["tokens"].min() >= 0 and batch["tokens"].max() < len(task.vocab)
    per_window = batch["loss_mask"].reshape(64, task.num_windows, task.window).any(axis=(0, 2))
    np.testing.assert_array_equal(per_window, ~np.array(task.consolidation_windows))
    assert batch["loss_mask"].sum(1).min() >= 1
    assert set(np.unique(batch["group"])) <= set(task.groups) | ({0} if name == "multi_hop" else set())


@pytest.mark.parametrize("name,params", SMALL_TASKS)
def test_example_is_a_pure_function_of_split_and_index(name, params):
  task = tasks.get(name, **params)
  indices = [5, 0, 17, 5]
  batch = task.examples("test", indices)
  for row, index in enumerate(indices):
    single = task.example("test", index)
    for key in ("tokens", "targets", "loss_mask"):
      np.testing.assert_array_equal(single[key], batch[key][row])
    assert single["group"] == batch["group"][row] and single["index"] == index
  np.testing.assert_array_equal(batch["tokens"][0], batch["tokens"][3])
  again = tasks.get(name, **params).examples("test", indices)
  np.testing.assert_array_equal(again["tokens"], batch["tokens"])
  # A larger test split extends a smaller one.
  bigger = tasks.get(name, **params, num_test=5000).examples("test", indices)
  np.testing.assert_array_equal(bigger["tokens"], batch["tokens"])


def _digest(name, params, split, indices):
  task = tasks.get(name, **params)
  batch = task.examples(split, np.asarray(indices))
  h = hashlib.sha256()
  for key in ("tokens", "targets", "loss_mask", "group"):
    h.update(np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()


def test_examples_are_identical_in_another_process():
  cases = [(name, params, split, [0, 3, 999_999_999_937])
           for name, params in SMALL_TASKS for split in ("train",)]
  cases += [(name, params, "test", [0, 1, 2, 500]) for name, params in SMALL_TASKS]
  script = (
      "import json, sys\n"
      "sys.path.insert(0, sys.argv[1])\n"
      "from test_tasks import _digest\n"
      "cases = json.loads(sys.stdin.read())\n"
      "print(json.dumps([_digest(*c) for c in cases]))\n"
  )
  env = dict(os.environ, PYTHONHASHSEED="12345")  # a different str hash seed must not matter
  out = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)],
                       input=json.dumps(cases), capture_output=True, text=True, env=env, check=True)
  assert json.loads(out.stdout) == [_digest(*c) for c in cases]


@pytest.mark.parametrize("name,params,num_train", [
    ("cellular_automaton", {}, 20000), ("multi_hop", {}, 20000), ("math", {"scale": "tiny"}, 3000)])
def test_train_and_test_splits_share_no_example(name, params, num_train):
  task = tasks.get(name, **params)

  def contents(split, count):
    batch = task.examples(split, np.arange(count))
    rows = np.concatenate([batch["tokens"], batch["targets"]], axis=1)
    return {row.tobytes() for row in rows}

  test = contents("test", task.num_test)
  assert len(test) == task.num_test  # no duplicates inside the test split either
  assert not test & contents("train", num_train)


# ----- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,flag", [
    ("cellular_automaton", {"t": -1}, "'t'"),
    ("cellular_automaton", {"t": 5000}, "'t'"),
    ("cellular_automaton", {"width": 65}, "'width'"),
    ("cellular_automaton", {"states": 0}, "'states'"),
    ("cellular_automaton", {"states": 17}, "'states'"),
    ("cellular_automaton", {"states": 5, "window": 4}, "'window'"),
    ("cellular_automaton", {"t": 2.5}, "'t'"),
    ("cellular_automaton", {"num_test": 0}, "'num_test'"),
    ("multi_hop", {"num_nodes": 76}, "'num_nodes'"),
    ("multi_hop", {"num_nodes": 1}, "'num_nodes'"),
    ("multi_hop", {"train_hops": (5, 2)}, "'train_hops'"),
    ("multi_hop", {"train_hops": (0, 16)}, "'train_hops'"),
    ("multi_hop", {"train_hops": (1, 2, 3)}, "'train_hops'"),
    ("multi_hop", {"eval_hops": (1, 33)}, "'eval_hops'"),
    ("multi_hop", {"eval_hops": ()}, "'eval_hops'"),
    ("multi_hop", {"num_queries": 20}, "'window'"),
])
def test_out_of_range_parameters_raise_value_errors_naming_them(name, params, flag):
  with pytest.raises(ValueError, match=flag):
    tasks.get(name, **params)


def test_bad_names_splits_and_indices():
  with pytest.raises(ValueError, match="unknown task"):
    tasks.get("sudoku")
  with pytest.raises(ValueError, match="no parameter"):
    tasks.get("multi_hop", t=3)
  task = tasks.get("cellular_automaton", num_test=10)
  with pytest.raises(ValueError, match="index must be in"):
    task.example("test", 10)
  with pytest.raises(ValueError, match="index must be in"):
    task.example("train", -1)
  with pytest.raises(ValueError, match="split"):
    task.example("validation", 0)
  with pytest.raises(ValueError, match="index"):
    task.example("test", 1.0)


# ----- evaluation -----------------------------------------------------------------------------


def test_evaluate_groups_metrics_and_pads_the_last_batch():
  task = tasks.get("multi_hop", num_test=23)
  calls = []

  def score_fn(tokens, targets, loss_mask):
    # Right on every k = 1 query, wrong on the first supervised position of other examples.
    calls.append(tokens.shape)
    predictions = targets.copy()
    for row in range(len(tokens)):
      hop = task.vocab[tokens[row, 301]]
      if tokens[row, 300] != 0 and hop != "1":
        predictions[row, np.flatnonzero(loss_mask[row])[0]] = 0
    return predictions, np.where(loss_mask, 0.25, 99.0)

  metrics = task.evaluate(score_fn, batch_size=8)
  assert calls == [(8, task.seq_len)] * 3
  counts = {k: sum(task.eval_hops[i % 5] == k for i in range(23)) for k in task.groups}
  assert {g: m["count"] for g, m in metrics.items() if g != "all"} == {f"k={k}": c for k, c in counts.items()}
  assert metrics["k=1"] == {"accuracy": 1.0, "exact": 1.0, "loss": 0.25, "count": counts[1]}
  for k in (2, 4, 8, 16):
    assert metrics[f"k={k}"]["accuracy"] == pytest.approx(0.9)
    assert metrics[f"k={k}"]["exact"] == 0.0
  assert metrics["all"]["count"] == 23
  assert metrics["all"]["accuracy"] == pytest.approx((230 - (23 - counts[1])) / 230)
  assert metrics["all"]["exact"] == pytest.approx(counts[1] / 23)


def test_describe_marks_windows_and_answers():
  for name, params in SMALL_TASKS:
    task = tasks.get(name, **params)
    example = task.example("test", 3)
    text = task.describe(example, width=100)
    assert text.count("── window ") == task.num_windows
    assert text.count("prediction (wake)") == task.consolidation_windows.count(False)
    supervised = np.flatnonzero(example["loss_mask"])
    for position in supervised:
      assert f"→{task.vocab[example['targets'][position]]}]" in text
    assert "\x1b[" not in text and "\x1b[" in task.describe(example, color=True, width=100)


def test_show_command_prints_an_example():
  out = subprocess.run(
      [sys.executable, "-m", "sleep_jax.tasks.show", "--task=multi_hop", "--index=4",
       "--num_nodes=9", "--eval_hops=3", "--columns=90"],
      capture_output=True, text=True, check=True).stdout
  task = tasks.get("multi_hop", num_nodes=9, eval_hops=(3,))
  assert "num_nodes=9" in out and "example 4  k=3" in out
  assert out == task.describe(task.example("test", 4), width=90) + "\n"
