"""Grade-school arithmetic word problems in the style of GSM-Infinite, generated procedurally.

A problem is a set of quantities ("the number of adult lions in Riverton"), each defined by exactly
one statement: a value ("there are 7 adult lions in Riverton .") or one operation on two operands
("... equals A plus B .", "... is 3 less than A ."). The question names one quantity whose
dependency tree holds exactly ``ops`` operations (the difficulty group); distractor statements,
which may depend on anything but are never needed, fill the context to a length drawn per example.
Statements appear in random order. All arithmetic is modulo ``modulus`` (23 by default), so the
answer is one number token and every problem is well defined (no fractions, no negatives).

Sequence layout: ``Question : ... ? Context : <statements> Answer :`` from position 0, padded at
the end to ``seq_len``. The question comes first (it lies in window 0, a consolidation window); the
answer is supervised at the final ``:``, which always falls in the last window, the only prediction
window. With hard eviction, the question is therefore visible at answer time only through the
fast-weight state: the model has to carry what is asked, and what it needs, across boundaries.

Scales (``scale`` sets defaults; ``window``, ``length`` and ``ops`` override them):

=======  ======  ===========  ========  ======
scale    L       length       T         ops
=======  ======  ===========  ========  ======
tiny     32      100-128      128       1-2
small    128     400-512      512       1-8
paper    2000    2001-3300    4000      1-8
=======  ======  ===========  ========  ======

``seq_len`` is ``length`` high rounded up to a multiple of L, and ``length`` low is raised so the
answer always lands in the last window: e.g. ``scale="paper", window=512`` gives T = 3584 and
lengths 3073-3300. A problem's length is drawn by adding distractors, in order, while they fit a
target drawn uniformly from [low + 27, high] (27 tokens is the longest statement), so every length
lies in [low, high].

Generation is vectorised over a batch: each problem's answer tree (a handful of statements) is
built in Python, and everything else (distractors, rendering, shuffling) with numpy. Every batch
is checked by ``math_solver``, which reads only the token strings, before it is returned.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np

from sleep_jax.tasks import base, math_solver, randomness

ADJECTIVES = ("adult", "baby", "young", "old", "wild", "spotted", "striped", "male", "female",
              "small", "large", "sleepy")
NOUNS = ("lions", "tigers", "bears", "wolves", "foxes", "eagles", "owls", "parrots", "deer",
         "horses", "goats", "sheep", "camels", "zebras", "otters", "beavers", "rabbits", "squirrels",
         "ducks", "geese", "swans", "herons", "frogs", "turtles", "snakes", "lizards", "bats",
         "moles", "badgers", "hedgehogs", "penguins", "seals", "dolphins", "whales", "sharks",
         "crabs", "bees", "ants", "moths", "beetles")
PLACES = ("Riverton", "Oakdale", "Maplewood", "Brookfield", "Cedarville", "Elmstead", "Fairhaven",
          "Glenwood", "Hillcrest", "Ironbridge", "Juniper", "Kingsport", "Lakeside", "Millbrook",
          "Northgate", "Oldtown", "Pinecrest", "Queensbury", "Redwood", "Stonehill", "Thornbury",
          "Upton", "Valewood", "Westfield", "Yarrow", "Ashford", "Birchwood", "Clearwater",
          "Dunmore", "Eastwick", "Foxley", "Greenhill", "Harborview", "Ivydale", "Kestrel",
          "Larkspur", "Meadowbrook", "Newhaven", "Oakridge", "Pebblebrook", "Ravenscroft",
          "Silverlake", "Timberline", "Willowby", "Amberley", "Bramblewood", "Coldharbor",
          "Driftwood", "Emberton", "Fernhill", "Goldcrest", "Hawthorne", "Islington", "Jasperville",
          "Kingsley", "Lindenhurst", "Marshfield", "Norwood", "Orchardview", "Primrose")
NUM_QUANTITIES = len(ADJECTIVES) * len(NOUNS) * len(PLACES)  # quantity q = (adjective, noun, place)

# Templates. A is the defined quantity, B and C its operands, V a number, A_BARE the defined
# quantity without article ("adult lions in Riverton"). Each of A, B, C takes one of MENTIONS.
MENTIONS = ("the number of ADJ NOUN in PLACE", "the count of ADJ NOUN at PLACE", "PLACE 's ADJ NOUN")
BARE_MENTION = "ADJ NOUN in PLACE"
QUESTIONS = ("Question : what is A ?", "Question : how many A_BARE are there ?",
             "Question : find A .")
STATEMENTS = {  # (operation, operands are two quantities) -> phrasings
    ("value", False): ("A is V .", "A equals V .", "there are V A_BARE ."),
    ("add", True): ("A equals B plus C .", "A is the sum of B and C .", "B and C together make A ."),
    ("add", False): ("A is V more than B .", "A equals B plus V .", "B plus V gives A ."),
    ("sub", True): ("A equals B minus C .", "A is the difference between B and C .",
                    "B minus C gives A ."),
    ("sub", False): ("A is V less than B .", "A equals B minus V .", "B minus V gives A ."),
    ("mul", True): ("A equals B times C .", "A is the product of B and C .", "B times C gives A ."),
    ("mul", False): ("A is V times B .", "A equals B times V .", "B times V gives A ."),
}
FRAME = ("Context :", "Answer :")
SLOT_WORDS = ("A", "B", "C", "V", "A_BARE", "ADJ", "NOUN", "PLACE")
OPERATIONS = ("add", "sub", "mul")
PHRASINGS = 3  # per group of STATEMENTS, and of QUESTIONS

# Pattern codes: a token id (>= 0), a number V (-10) or part p of the quantity in slot s
# (-(1 + 3 s + p), with slots A, B, C = 0, 1, 2 and parts adjective, noun, place = 0, 1, 2).
_NUMBER_CODE = -10
_PART_CODE = {"ADJ": 0, "NOUN": 1, "PLACE": 2}

SCALES = {
    "tiny": {"window": 32, "length": (100, 128), "ops": (1, 2)},
    "small": {"window": 128, "length": (400, 512), "ops": (1, 8)},
    "paper": {"window": 2000, "length": (2000, 3300), "ops": (1, 8)},
}


def _template_words() -> list[str]:
  """Every literal word of the templates, in first-appearance order (a stable vocabulary)."""
  texts = list(MENTIONS) + [BARE_MENTION] + list(QUESTIONS) + list(FRAME)
  texts += [t for group in STATEMENTS.values() for t in group]
  words: list[str] = []
  for text in texts:
    for word in text.split():
      if word not in SLOT_WORDS and word not in words:
        words.append(word)
  return words


def _expand(text: str, forms: tuple[int, int, int]) -> list[str]:
  """A template's words with each quantity slot replaced by its mention form's words."""
  out = []
  for word in text.split():
    if word in ("A", "B", "C"):
      slot = "ABC".index(word)
      out += [f"{w}.{slot}" if w in _PART_CODE else w for w in MENTIONS[forms[slot]].split()]
    elif word == "A_BARE":
      out += [f"{w}.0" if w in _PART_CODE else w for w in BARE_MENTION.split()]
    else:
      out.append(word)
  return out


# Every statement template in a flat list: template id t = 3 * group + phrasing.
_GROUPS = list(STATEMENTS)
TEMPLATES = [text for group in _GROUPS for text in STATEMENTS[group]]
_LONGEST_MENTION = max(len(m.split()) for m in MENTIONS)


def _template_length(text: str, forms=(0, 0, 0)) -> int:
  return len(_expand(text, forms))


def _worst_path_length(ops: int) -> int:
  """An upper bound on the tokens of a problem without distractors (question and frame too)."""
  longest = lambda texts: max(_template_length(t, (f, f, f)) for t in texts for f in range(3))
  value_texts = STATEMENTS[("value", False)]
  op_texts = [t for group, texts in STATEMENTS.items() if group[0] != "value" for t in texts]
  frame = longest(QUESTIONS) + sum(len(f.split()) for f in FRAME)
  return frame + ops * longest(op_texts) + (ops + 1) * longest(value_texts)


def _max_ops(high: int) -> int:
  return max([n for n in range(1, 17) if _worst_path_length(n) <= high], default=0)


_ALL_LENGTHS = [_template_length(t, (a, b, c)) for t in TEMPLATES
                for a in range(3) for b in range(3) for c in range(3)]
LONGEST_STATEMENT, SHORTEST_STATEMENT = max(_ALL_LENGTHS), min(_ALL_LENGTHS)
MEAN_STATEMENT = int(sum(_ALL_LENGTHS) / len(_ALL_LENGTHS))  # rounded down: chunks rarely fall short


@dataclasses.dataclass(frozen=True)
class MathProblems(base.Task):
  """GSM-Infinite-style math task. Groups: ``ops``; chance 1 / modulus."""

  name = "math"
  group_name = "ops"

  scale: str = dataclasses.field(default="small", metadata={"kind": "str", "doc": "tiny, small or paper"})
  window: int | None = dataclasses.field(default=None, metadata={"doc": "window length L (scale's)"})
  length: tuple[int, int] | None = dataclasses.field(
      default=None, metadata={"kind": "tuple", "doc": "content length range in tokens (scale's)"})
  ops: tuple[int, int] | None = dataclasses.field(
      default=None, metadata={"kind": "tuple", "doc": "operation count range (scale's)"})
  modulus: int = dataclasses.field(default=23, metadata={"doc": "arithmetic modulus (answer tokens)"})
  num_test: int = dataclasses.field(default=1600, metadata={"doc": "test split size"})

  def __post_init__(self):
    task, set_ = self.name, object.__setattr__
    if self.scale not in SCALES:
      raise ValueError(f"{task} parameter 'scale' must be one of {sorted(SCALES)}, got {self.scale!r}")
    preset = SCALES[self.scale]
    window = base.check_int(task, "window", preset["window"] if self.window is None else self.window,
                            8, 65536)
    low, high = base.check_int_tuple(task, "length", preset["length"] if self.length is None
                                     else self.length, 16, 100_000, length=2, ordered=True)
    ops = base.check_int_tuple(task, "ops", preset["ops"] if self.ops is None else self.ops, 1, 16,
                               length=2, ordered=True)
    base.check_int(task, "modulus", self.modulus, 3, 1000)
    base.check_int(task, "num_test", self.num_test, 1, 10**7)
    seq_len = -(-high // window) * window
    if seq_len // window < 2:
      raise ValueError(f"{task} parameter 'length' must reach past one window: high must be in "
                       f"[{window + 1}, 100000] for window {window}, got {high}")
    low = max(low, seq_len - window + 1)  # the answer must fall in the last window
    if high - low < LONGEST_STATEMENT:
      raise ValueError(
          f"{task} parameter 'length' leaves too narrow a range ({low}..{high}) for window "
          f"{window}: high - low must be at least {LONGEST_STATEMENT}, where low is raised to "
          f"{seq_len - window + 1} so the answer falls in the last window")
    if _worst_path_length(ops[1]) > high:
      raise ValueError(f"{task} parameter 'ops' must be a pair in [1, {_max_ops(high)}] for "
                       f"length high {high} (a problem must fit), got {ops}")
    set_(self, "window", window)
    set_(self, "length", (low, high))
    set_(self, "ops", ops)
    vocab = [base.PAD] + _template_words() + list(ADJECTIVES) + list(NOUNS) + list(PLACES)
    vocab += [str(v) for v in range(self.modulus)]
    self._set_layout(
        vocab=vocab,
        seq_len=seq_len,
        consolidation_windows=[True] * (seq_len // window - 1) + [False],
        groups=list(range(ops[0], ops[1] + 1)),
        chance={"accuracy": 1.0 / self.modulus, "exact": 1.0 / self.modulus},
    )
    self._build_tables()

  def _build_tables(self) -> None:
    """Token tables: the words of every quantity, and every template with every mention form."""
    ids = self._token_ids
    quantity = np.arange(NUM_QUANTITIES)
    adjective, rest = np.divmod(quantity, len(NOUNS) * len(PLACES))
    noun, place = np.divmod(rest, len(PLACES))
    parts = np.stack([np.array([ids[w] for w in ADJECTIVES])[adjective],
                      np.array([ids[w] for w in NOUNS])[noun],
                      np.array([ids[w] for w in PLACES])[place]], axis=1)  # [quantities 3]

    def codes(words: list[str]) -> list[int]:
      out = []
      for w in words:
        if w == "V":
          out.append(_NUMBER_CODE)
        elif "." in w and w.split(".")[0] in _PART_CODE:
          part, slot = w.split(".")
          out.append(-(1 + 3 * int(slot) + _PART_CODE[part]))
        else:
          out.append(ids[w])
      return out

    # Pattern id = 27 * template + 9 * form(A) + 3 * form(B) + form(C) for statements; then
    # the questions (27 * question + 9 * form(A)) and the two frame pieces.
    patterns = [codes(_expand(t, (a, b, c))) for t in TEMPLATES
                for a in range(3) for b in range(3) for c in range(3)]
    patterns += [codes(_expand(q, (a, b, c))) for q in QUESTIONS
                 for a in range(3) for b in range(3) for c in range(3)]
    patterns += [codes(f.split()) for f in FRAME]
    table = np.zeros((len(patterns), max(map(len, patterns))), np.int32)
    for i, p in enumerate(patterns):
      table[i, :len(p)] = p
    set_ = object.__setattr__
    set_(self, "_parts", parts.astype(np.int32))
    set_(self, "_patterns", table)
    set_(self, "_pattern_len", np.array([len(p) for p in patterns], np.int32))
    set_(self, "_question_pattern0", 27 * len(TEMPLATES))
    set_(self, "_context_pattern", len(patterns) - 2)
    set_(self, "_answer_pattern", len(patterns) - 1)
    set_(self, "_number0", ids["0"])

  # ----- generation ------------------------------------------------------------------------

  def _generate(self, split, indices, keys):
    size, m = len(keys), self.modulus
    low_ops, high_ops = self.ops
    if split == "test":
      ops = low_ops + indices % (high_ops - low_ops + 1)
    else:  # uniform over the range, from the example's own key
      ops = low_ops + ((keys >> np.uint64(40)) % np.uint64(high_ops - low_ops + 1)).astype(np.int64)

    # Quantity number i of a problem is its own permutation of all quantities at i: distinct.
    # The answer tree takes the first ones, distractors the following ones.
    path_max = 2 * high_ops + 1  # derived quantities plus at most one base more
    tree_quantities = self._quantities(keys[:, None], np.arange(path_max)[None, :]).tolist()
    rows = []  # statement rows: (problem, section, pattern, A, B, C, V, serial)
    used = np.zeros(size, np.int64)  # quantities taken by each answer tree
    answers = np.zeros(size, np.int64)
    for e in range(size):
      rng = random.Random(int(keys[e]))
      tree_rows, used[e], answers[e] = self._answer_tree(rng, int(ops[e]), tree_quantities[e])
      question = self._question_pattern0 + 27 * int(rng.random() * PHRASINGS) + 9 * int(rng.random() * 3)
      rows += [(e, 0, question, tree_rows[0][1], 0, 0, 0, 0), (e, 1, self._context_pattern, 0, 0, 0, 0, 0),
               (e, 3, self._answer_pattern, 0, 0, 0, 0, 0)]
      rows += [(e, 2) + r + (serial,) for serial, r in enumerate(tree_rows)]
    fixed_rows = np.array(rows, np.int64)
    fixed = np.bincount(fixed_rows[:, 0], weights=self._pattern_len[fixed_rows[:, 2]],
                        minlength=size).astype(np.int64)  # tokens of question, frame and tree
    table = np.concatenate([fixed_rows, self._distractors(keys, used, fixed)])

    # Shuffle the statements of each problem (section 2) between question and answer, by keys
    # drawn from the problem's key and each statement's serial number within the problem.
    shuffle = randomness.mix64(keys[table[:, 0]] + randomness.mix64(
        table[:, 7].astype(np.uint64) + np.uint64(0x5EED)))
    table = table[np.lexsort((shuffle, table[:, 1], table[:, 0]))]
    tokens, lengths = self._render(table, size)
    answer_at = lengths - 1
    low, high = self.length
    assert np.all((lengths >= low) & (lengths <= high)), (lengths, self.length)

    got_answer, got_ops = math_solver.solve_batch(tokens, lengths, self.vocab, m)
    if not (np.array_equal(got_answer, answers) and np.array_equal(got_ops, ops)):
      bad = int(np.flatnonzero((got_answer != answers) | (got_ops != ops))[0])
      raise RuntimeError(f"math generator disagrees with its solver on problem {bad}: answer "
                         f"{answers[bad]} vs {got_answer[bad]}, ops {ops[bad]} vs {got_ops[bad]}")
    batch = self.empty_batch(size)
    batch["tokens"][:, :tokens.shape[1]] = tokens
    batch["targets"][np.arange(size), answer_at] = self._number0 + answers
    batch["loss_mask"][np.arange(size), answer_at] = True
    batch["group"] = ops.astype(np.int32)
    return batch

  def _answer_tree(self, rng: random.Random, ops: int, quantities: list[int]):
    """The question's dependency tree, exactly ``ops`` derived quantities, built top-down.

    Returns its statement rows (pattern, A, B, C, V) with the question's statement first, the
    number of quantities taken from ``quantities``, and the answer.
    """
    below = lambda n: int(rng.random() * n)  # a uniform integer in [0, n); faster than randrange
    for _ in range(100):
      definitions, derived, bases = self._tree_shape(below, ops, quantities)
      # Base values, redrawn while a product on the path has a zero factor, which would
      # make the answer independent of the other factor's subtree (a shortcut). Shared
      # bases can make a factor zero whatever the values (B + C - (B + C)): then reshape.
      for _ in range(20):
        values = self._tree_values(below, definitions, derived, bases)
        if not any(definitions[q][0] == "mul" and 0 in [values[o] for o in definitions[q][1]]
                   for q in derived):
          break
      else:
        continue
      rows = []
      for q in derived + bases:
        operation, operands, constant = definitions.get(q, ("value", (), values[q]))
        group = _GROUPS.index((operation, len(operands) == 2))
        template = PHRASINGS * group + below(PHRASINGS)
        pattern = 27 * template + 9 * below(3) + 3 * below(3) + below(3)
        b, c = (list(operands) + [0, 0])[:2]
        rows.append((pattern, q, b, c, constant or 0))
      return rows, len(derived) + len(bases), values[derived[0]]
    raise RuntimeError("no answer tree without a constant zero factor after 100 tries")

  def _tree_shape(self, below, ops: int, quantities: list[int]):
    """Definitions (q -> (operation, operands, constant)), derived quantities (parents first)
    and base quantities of a random tree with ``ops`` operations over ``quantities`` in order."""
    m = self.modulus
    taken = iter(quantities)
    definitions: dict[int, tuple] = {}
    frontier, derived, bases = [next(taken)], [], []
    budget = ops - 1
    while frontier:
      q = frontier.pop(below(len(frontier)))
      derived.append(q)
      operation = OPERATIONS[below(3)]
      slots = 2 if below(2) else 1
      operands: list[int] = []
      for slot in range(slots):
        # The last open node's last operand must carry any remaining budget onwards.
        must_derive = budget > 0 and not frontier and slot == slots - 1
        reusable = [b for b in bases if b not in operands]
        if budget > 0 and (must_derive or below(2)):
          child = next(taken)
          frontier.append(child)
          budget -= 1
        elif reusable and below(4) == 0:
          child = reusable[below(len(reusable))]
        else:
          child = next(taken)
          bases.append(child)
        operands.append(child)
      low = 2 if operation == "mul" else 1
      constant = None if slots == 2 else low + below(m - low)
      definitions[q] = (operation, tuple(operands), constant)
    return definitions, derived, bases

  def _tree_values(self, below, definitions: dict, derived: list[int], bases: list[int]) -> dict:
    m = self.modulus
    values = {b: below(m) for b in bases}
    for q in reversed(derived):  # children were opened after their parents
      operation, operands, constant = definitions[q]
      a = values[operands[0]]
      b = values[operands[1]] if len(operands) == 2 else constant
      values[q] = (a + b if operation == "add" else a - b if operation == "sub" else a * b) % m
    return values

  def _quantities(self, keys: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Quantity number ``numbers`` of the problems with ``keys`` (broadcast): a quantity id."""
    return randomness.permute_below(numbers, keys, NUM_QUANTITIES)

  def _distractors(self, keys: np.ndarray, used: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Distractor statement rows, in order of creation, while they fit each problem's target.

    Candidate j of a problem defines its quantity number ``used + j`` in terms of quantities
    with lower numbers (its answer tree's or earlier distractors'), so no cycle can arise. Its
    draws depend on the problem's key and j alone. Candidates are drawn in chunks of about what
    a problem needs, and only for the problems still filling up.
    """
    m, low, high = self.modulus, self.length[0], self.length[1]
    target = low + LONGEST_STATEMENT + randomness.below(randomness.draws(keys, 1, 1)[:, 0],
                                                        high - low - LONGEST_STATEMENT + 1)
    room = target - fixed  # tokens left for distractors
    chunk = -(-high // MEAN_STATEMENT)
    most = -(-high // SHORTEST_STATEMENT)  # enough for any target
    pieces, open_, start = [], np.arange(len(keys)), 0
    while open_.size and start < most:
      count = min(chunk, most - start)
      j = start + np.arange(count)
      # Five draws a candidate, each giving two integers (its high and low 32 bits).
      d = randomness.draws(keys[open_], 2, 5 * count, start=5 * start).reshape(len(open_), count, 5)
      kind = randomness.below(d[..., 0], 40)  # 14/40 values, 13/40 two-quantity, 13/40 constant
      operation = randomness.below(d[..., 0], 3, low_half=True)
      binary = (kind >= 14) & (kind < 27)
      group = np.where(kind < 14, _GROUPS.index(("value", False)),
                       1 + 2 * operation + (~binary).astype(np.int64))  # _GROUPS order
      template = PHRASINGS * group + randomness.below(d[..., 1], PHRASINGS)
      pattern = (27 * template + 9 * randomness.below(d[..., 1], 3, low_half=True)
                 + 3 * randomness.below(d[..., 2], 3) + randomness.below(d[..., 2], 3, low_half=True))
      constant = np.where(kind < 14, randomness.below(d[..., 3], m),
                          np.where(operation == 2, 2 + randomness.below(d[..., 3], m - 2),
                                   1 + randomness.below(d[..., 3], m - 1)))
      number = used[open_, None] + j  # the new quantity's number
      first = randomness.below(d[..., 3], number, low_half=True)  # operands: earlier, distinct
      second = randomness.below(d[..., 4], number - 1)
      second += second >= first
      key = keys[open_, None]
      a, b, c = (self._quantities(key, x) for x in (number, first, second))
      spent = np.cumsum(self._pattern_len[pattern], axis=1)
      keep = spent <= room[open_, None]
      problem = np.broadcast_to(open_[:, None], keep.shape)
      columns = (problem, np.full(keep.shape, 2), pattern, a, np.where(kind < 14, 0, b),
                 np.where(binary, c, 0), np.where(binary, 0, constant),
                 1000 + np.broadcast_to(j, keep.shape))  # serials after the tree's
      pieces.append(np.stack([col[keep] for col in columns], axis=1).astype(np.int64))
      room[open_] -= np.where(keep, self._pattern_len[pattern], 0).sum(axis=1)
      open_ = open_[keep.all(axis=1)]  # a problem that kept every candidate may take more
      start += count
    return np.concatenate(pieces) if pieces else np.zeros((0, 8), np.int64)

  def _render(self, table: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [b max_len] and lengths [b] of statement rows sorted by problem."""
    table = table.astype(np.int32)  # int32 throughout: half the memory traffic of int64
    problem, pattern = table[:, 0], table[:, 2]
    lengths = self._pattern_len[pattern]
    total = int(lengths.sum())
    row = np.repeat(np.arange(len(table), dtype=np.int32), lengths)
    offset = np.arange(total, dtype=np.int32) - (np.cumsum(lengths, dtype=np.int32) - lengths)[row]
    code = self._patterns.ravel()[pattern[row] * self._patterns.shape[1] + offset]  # one gather
    part = np.maximum(-code - 1, 0)  # 3 * slot + part for quantity codes
    quantity = table.ravel()[row * table.shape[1] + 3 + np.minimum(part // 3, 2)]
    tokens = np.where(code >= 0, code,
                      np.where(code == _NUMBER_CODE, self._number0 + table[row, 6],
                               self._parts.ravel()[quantity * 3 + part % 3]))
    per_problem = np.bincount(problem, weights=lengths, minlength=size).astype(np.int64)
    longest = int(per_problem.max())
    first = (np.cumsum(per_problem) - per_problem).astype(np.int32)
    position = np.arange(total, dtype=np.int32) - first[problem[row]]
    out = np.zeros(size * longest, np.int32)
    out[problem[row] * longest + position] = tokens
    return out.reshape(size, longest), per_problem

  # ----- viewing ---------------------------------------------------------------------------

  def explain(self, example: dict[str, Any]) -> list[str]:
    tokens = [t for t in example["tokens"] if t != self.token_id(base.PAD)]
    solution = math_solver.solve_tokens(tokens, self.vocab, self.modulus)
    names = {q: f"[{i + 1}]" for i, q in enumerate(solution.chain)}
    symbol = {"add": "+", "sub": "-", "mul": "×"}
    lines = [f"dependency chain of the question ({solution.ops} operations, arithmetic mod "
             f"{self.modulus}):"]
    for q in solution.chain:
      definition = solution.definitions[q]
      label = f"  {names[q]:>5} {' '.join(q[1:])} in {q[0]}"
      if definition.op == "value":
        lines.append(f"{label} = {solution.values[q]}")
        continue
      refs = [names[o] if isinstance(o, tuple) else str(o) for o in definition.operands]
      nums = [str(solution.values[o]) if isinstance(o, tuple) else str(o) for o in definition.operands]
      op = f" {symbol[definition.op]} "
      lines.append(f"{label} = {op.join(refs)} = {op.join(nums)} = {solution.values[q]}")
    lines.append(f"answer: {solution.answer}   ({len(solution.chain)} of "
                 f"{solution.num_statements} statements needed; {len(tokens)} tokens)")
    return lines
