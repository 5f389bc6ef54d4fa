"""Tests of the math word-problem task against a solver written here from the problem language.

The reference reads the rendered words only: it recognises each sentence with a regular expression
per phrasing, evaluates the quantities by repeated substitution (a fixed point, not the package's
depth-first walk) and counts the operations on the question's dependency set.
"""

import re

import numpy as np
import pytest

from sleep_jax import tasks
from sleep_jax.tasks import math_solver

# A quantity: "the number of X Y in P", "the count of X Y at P", "P 's X Y"; a bare one "X Y in P".
Q = r"(?:the number of [a-z]+ [a-z]+ in [A-Z][a-z]+|the count of [a-z]+ [a-z]+ at [A-Z][a-z]+|[A-Z][a-z]+ 's [a-z]+ [a-z]+)"
BARE = r"[a-z]+ [a-z]+ in [A-Z][a-z]+"
N = r"\d+"
# (pattern, kind, operation): kind says where the defined quantity (d), operands (x, y) and the
# number (v) are; "sub" keeps x - y / x - v order.
PHRASINGS = [
    (rf"(?P<d>{Q}) is (?P<v>{N})", "value", None),
    (rf"(?P<d>{Q}) equals (?P<v>{N})", "value", None),
    (rf"there are (?P<v>{N}) (?P<d>{BARE})", "value", None),
    (rf"(?P<d>{Q}) equals (?P<x>{Q}) plus (?P<y>{Q})", "pair", "+"),
    (rf"(?P<d>{Q}) is the sum of (?P<x>{Q}) and (?P<y>{Q})", "pair", "+"),
    (rf"(?P<x>{Q}) and (?P<y>{Q}) together make (?P<d>{Q})", "pair", "+"),
    (rf"(?P<d>{Q}) is (?P<v>{N}) more than (?P<x>{Q})", "const", "+"),
    (rf"(?P<d>{Q}) equals (?P<x>{Q}) plus (?P<v>{N})", "const", "+"),
    (rf"(?P<x>{Q}) plus (?P<v>{N}) gives (?P<d>{Q})", "const", "+"),
    (rf"(?P<d>{Q}) equals (?P<x>{Q}) minus (?P<y>{Q})", "pair", "-"),
    (rf"(?P<d>{Q}) is the difference between (?P<x>{Q}) and (?P<y>{Q})", "pair", "-"),
    (rf"(?P<x>{Q}) minus (?P<y>{Q}) gives (?P<d>{Q})", "pair", "-"),
    (rf"(?P<d>{Q}) is (?P<v>{N}) less than (?P<x>{Q})", "const", "-"),
    (rf"(?P<d>{Q}) equals (?P<x>{Q}) minus (?P<v>{N})", "const", "-"),
    (rf"(?P<x>{Q}) minus (?P<v>{N}) gives (?P<d>{Q})", "const", "-"),
    (rf"(?P<d>{Q}) equals (?P<x>{Q}) times (?P<y>{Q})", "pair", "*"),
    (rf"(?P<d>{Q}) is the product of (?P<x>{Q}) and (?P<y>{Q})", "pair", "*"),
    (rf"(?P<x>{Q}) times (?P<y>{Q}) gives (?P<d>{Q})", "pair", "*"),
    (rf"(?P<d>{Q}) is (?P<v>{N}) times (?P<x>{Q})", "const", "*"),
    (rf"(?P<d>{Q}) equals (?P<x>{Q}) times (?P<v>{N})", "const", "*"),
    (rf"(?P<x>{Q}) times (?P<v>{N}) gives (?P<d>{Q})", "const", "*"),
]
QUESTION = re.compile(rf"Question : (?:what is (?P<a>{Q}) \?|how many (?P<b>{BARE}) are there \?|find (?P<c>{Q}) \.) Context : ")


def key(mention):
  """A quantity's identity: (adjective, noun, place), whatever the phrasing."""
  m = re.fullmatch(r"(?:the number of |the count of )?([a-z]+) ([a-z]+) (?:in|at) ([A-Z][a-z]+)", mention)
  if m:
    return m.groups()
  place, adjective, noun = re.fullmatch(r"([A-Z][a-z]+) 's ([a-z]+) ([a-z]+)", mention).groups()
  return adjective, noun, place


def reference_solve(text, modulus):
  """(answer, ops, phrasings used, number of statements) of a problem's text."""
  question = QUESTION.match(text)
  assert question, text[:200]
  asked = key(next(g for g in question.groups() if g))
  body, tail = text[question.end():].rsplit(" Answer :", 1)
  assert tail == ""
  definitions, used = {}, set()
  for sentence in body.split(" . "):
    sentence = sentence.removesuffix(" .")
    matches = [(i, m) for i, (p, _, _) in enumerate(PHRASINGS) if (m := re.fullmatch(p, sentence))]
    assert len(matches) == 1, sentence  # every sentence reads one way only
    i, m = matches[0]
    used.add(i)
    _, kind, op = PHRASINGS[i]
    d = key(m["d"])
    assert d not in definitions, f"{d} defined twice"
    operands = [] if kind == "value" else [key(m["x"])] + ([key(m["y"])] if kind == "pair" else [])
    constant = int(m["v"]) if kind in ("value", "const") else None
    definitions[d] = (op, operands, constant)

  values = {}
  while len(values) < len(definitions):  # substitute until every quantity is known
    progress = False
    for d, (op, operands, constant) in definitions.items():
      if d in values or any(o not in values for o in operands):
        continue
      args = [values[o] for o in operands] + ([constant] if constant is not None else [])
      values[d] = (args[0] if op is None else
                   args[0] + args[1] if op == "+" else
                   args[0] - args[1] if op == "-" else args[0] * args[1]) % modulus
      progress = True
    assert progress, "undefined reference or cycle"
  needed, todo = set(), [asked]
  while todo:
    q = todo.pop()
    if q not in needed:
      needed.add(q)
      todo.extend(definitions[q][1])
  ops = sum(definitions[q][0] is not None for q in needed)
  return values[asked], ops, used, len(definitions)


def content(task, row):
  return " ".join(task.vocab[t] for t in row if t != 0)


@pytest.mark.parametrize("params,count", [({"scale": "tiny"}, 60), ({"scale": "small"}, 40),
                                          ({"scale": "paper"}, 8), ({"scale": "paper", "window": 512}, 4),
                                          ({"scale": "small", "modulus": 7, "ops": (3, 5)}, 12)])
def test_answers_ops_and_layout_match_the_reference_solver(params, count):
  task = tasks.get("math", **params)
  for split in ("test", "train"):
    batch = task.examples(split, np.arange(count) * (1 if split == "test" else 7777))
    for row in range(count):
      tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
      answer, ops, _, _ = reference_solve(content(task, tokens), task.modulus)
      length = int((tokens != 0).sum())
      assert tokens[:length].all() and not tokens[length:].any()  # padding only at the end
      assert task.length[0] <= length <= task.length[1]
      np.testing.assert_array_equal(np.flatnonzero(mask), [length - 1])  # the final ":"
      assert length - 1 >= task.seq_len - task.window  # ... which lies in the last window
      assert task.vocab[batch["targets"][row, length - 1]] == str(answer)
      assert batch["group"][row] == ops and task.ops[0] <= ops <= task.ops[1]
      if split == "test":
        assert ops == task.ops[0] + row % (task.ops[1] - task.ops[0] + 1)


def test_scales():
  expected = {"tiny": (32, 128, (1, 2)), "small": (128, 512, (1, 8)), "paper": (2000, 4000, (1, 8))}
  for scale, (window, seq_len, ops) in expected.items():
    task = tasks.get("math", scale=scale)
    assert (task.window, task.seq_len, task.ops, task.groups) == (window, seq_len, ops,
                                                                   list(range(ops[0], ops[1] + 1)))
    assert task.consolidation_windows == (True,) * (seq_len // window - 1) + (False,)
    assert task.num_test == 1600 and task.chance["accuracy"] == 1 / 23
  assert tasks.get("math", scale="tiny").consolidation_windows.count(True) >= 2
  assert tasks.get("math", scale="paper").length == (2001, 3300)
  sliding = tasks.get("math", scale="paper", window=512)
  assert (sliding.seq_len, sliding.length) == (3584, (3073, 3300))


def test_problems_vary_in_surface_form_and_fill_the_context():
  task = tasks.get("math", scale="small")
  batch = task.examples("train", np.arange(60))
  used, statements, places = set(), [], set()
  for row in batch["tokens"]:
    text = content(task, row)
    _, ops, phrasings, count = reference_solve(text, task.modulus)
    used |= phrasings
    statements.append(count)
    places |= set(re.findall(r"\b[A-Z][a-z]+\b", text)) - {"Question", "Context", "Answer"}
  assert used == set(range(len(PHRASINGS)))  # every phrasing occurs
  assert len(places) >= 50  # many entity names
  assert min(statements) >= 15  # distractors fill a few hundred tokens
  # Answers are spread over all residues (no constant shortcut).
  answers = batch["targets"][batch["loss_mask"]]
  assert len(set(answers.tolist())) >= 15


def test_package_solver_rejects_ill_defined_problems():
  task = tasks.get("math", scale="tiny")
  words = [w for w in task.decode(task.example("test", 0)["tokens"]) if w != "<pad>"]
  math_solver.solve(words, 23)  # the real problem is fine
  end = words.index("Answer")
  first = words.index("Context") + 2
  statement = words[first:words.index(".", first) + 1]
  with pytest.raises(math_solver.IllDefined, match="defined twice"):
    math_solver.solve(words[:end] + statement + words[end:], 23)
  undefined = ["the", "number", "of", "old", "owls", "in", "Upton", "equals", "Foxley", "'s",
               "wild", "bees", "plus", "3", "."]
  with pytest.raises(math_solver.IllDefined, match="never defined"):
    math_solver.solve(words[:end] + undefined + words[end:], 23)
  cycle = ["the", "number", "of", "old", "owls", "in", "Upton", "equals", "Foxley", "'s", "wild",
           "bees", "plus", "3", ".", "Foxley", "'s", "wild", "bees", "is", "2", "more", "than",
           "the", "count", "of", "old", "owls", "at", "Upton", "."]
  with pytest.raises(math_solver.IllDefined, match="depends on itself"):
    math_solver.solve(words[:end] + cycle + words[end:], 23)


@pytest.mark.parametrize("params,flag", [
    ({"scale": "huge"}, "'scale'"),
    ({"ops": (0, 3)}, "'ops'"),
    ({"ops": (4, 2)}, "'ops'"),
    ({"scale": "tiny", "ops": (1, 8)}, "'ops'"),
    ({"length": (100, 120), "window": 128}, "'length'"),
    ({"length": (500, 400)}, "'length'"),
    ({"modulus": 2}, "'modulus'"),
    ({"window": 4}, "'window'"),
    ({"num_test": -1}, "'num_test'"),
])
def test_out_of_range_parameters(params, flag):
  with pytest.raises(ValueError, match=flag):
    tasks.get("math", **params)
