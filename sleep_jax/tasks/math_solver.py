"""Solves the math task's word problems from their words alone, to verify every generated problem.

The solver knows the grammar words of the problem language (operators, linking words, sentence
structure) but not the lexicon: a quantity is a run of content words, possibly joined by ``in``,
``at`` or ``'s``, holding exactly one capitalised place name and up to three other words; its
identity is the place and the other words in order, whatever the phrasing. It never sees the
generator's dependency graph, so a problem is emitted only if this reading of the text agrees with
the generator: every quantity defined exactly once, every reference defined, no cycles, and the
same answer and number of operations.

Reading is vectorised with numpy over a whole batch of problems at once (word classes come from
the vocabulary strings), and quantities are evaluated level by level.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

LINK_WORDS = frozenset({"in", "at", "'s"})  # join content words into one quantity
OPERATOR_WORDS = {
    "add": frozenset({"plus", "sum", "more", "together"}),
    "sub": frozenset({"minus", "difference", "less"}),
    "mul": frozenset({"times", "product"}),
}
DEFINED_LAST = frozenset({"gives", "make"})  # "B plus C gives A": the defined quantity comes last
FRAME = ("Question", "Context", "Answer", ":")
GRAMMAR_WORDS = frozenset({
    "the", "number", "of", "count", "is", "equals", "there", "are", "and", "than", "between",
    "what", "how", "many", "find", "?", ".",
}) | LINK_WORDS | DEFINED_LAST | frozenset(FRAME) | frozenset().union(*OPERATOR_WORDS.values())

# Word classes.
OTHER, NUMBER, PLACE, WORD, LINK, END, ADD, SUB, MUL, LAST, LESS = range(11)
OPS = ("value", "add", "sub", "mul")
MAX_WORDS = 3  # content words per quantity besides its place

Quantity = tuple  # (place, other content words...)


class IllDefined(ValueError):
  """The text does not define a unique answer."""


@dataclasses.dataclass(frozen=True)
class Definition:
  """How the text defines one quantity: ``op`` is "value", "add", "sub" or "mul"."""

  op: str
  operands: tuple  # quantities (tuples) and constants (ints), in evaluation order


@dataclasses.dataclass(frozen=True)
class Solution:
  question: Quantity
  answer: int
  ops: int  # operations among the quantities the answer needs (the question's included)
  chain: tuple  # the quantities the answer needs, in an evaluation order
  definitions: dict  # Quantity -> Definition, for the chain
  values: dict  # Quantity -> int, for the chain
  num_statements: int


@functools.lru_cache(maxsize=8)
def _classes(vocab: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """Class and numeric value of every token id, from the strings alone."""
  kind = np.full(len(vocab), OTHER, np.int8)
  value = np.zeros(len(vocab), np.int64)
  special = {w: code for code, op in ((ADD, "add"), (SUB, "sub"), (MUL, "mul")) for w in OPERATOR_WORDS[op]}
  special |= {".": END, "less": LESS} | {w: LINK for w in LINK_WORDS} | {w: LAST for w in DEFINED_LAST}
  for i, word in enumerate(vocab):
    if word.isdigit():
      kind[i], value[i] = NUMBER, int(word)
    elif word in special:
      kind[i] = special[word]
    elif word not in GRAMMAR_WORDS and word[:1].isalpha():
      kind[i] = PLACE if word[:1].isupper() else WORD
  return kind, value, {w: i for i, w in enumerate(vocab)}


def _shift(mask: np.ndarray, by: int) -> np.ndarray:
  """``mask`` moved ``by`` places later (by > 0) or earlier (by < 0), filled with False."""
  out = np.zeros_like(mask)
  if by > 0:
    out[by:] = mask[:-by]
  else:
    out[:by] = mask[-by:]
  return out


class _Problems:
  """The statements of a batch of problems, read from their concatenated token ids.

  Quantity keys pack the example number, the place id and up to three word ids into one int64,
  so equal keys mean the same quantity of the same problem.
  """

  def __init__(self, tokens: np.ndarray, lengths: np.ndarray, vocab: tuple[str, ...]):
    self.vocab = vocab
    kind, value, index = _classes(vocab)
    batch = len(lengths)
    self.bits = max(1, (len(vocab) - 1).bit_length())
    if (MAX_WORDS + 1) * self.bits + max(1, (batch - 1).bit_length()) > 63:
      raise ValueError(f"a batch of {batch} problems over {len(vocab)} words does not fit int64 keys")
    valid = np.arange(tokens.shape[1]) < lengths[:, None]
    ids = tokens[valid].astype(np.int32)  # [N] every problem's tokens, one after the other
    end = np.cumsum(lengths)
    start = end - lengths
    k = kind[ids]
    problem_of = lambda at: np.searchsorted(end, at, side="right")  # positions -> problem numbers

    # The frame: "Question : <question> Context : <statements> Answer :".
    question_id, context_id, answer_id, colon_id = (index.get(w, -1) for w in FRAME)
    context = np.flatnonzero(ids == context_id)
    counts = [np.bincount(problem_of(np.flatnonzero(ids == w)), minlength=batch)
              for w in (question_id, context_id, answer_id)]
    if any(np.any(c != 1) for c in counts):
      raise IllDefined("every problem needs one each of Question, Context and Answer")
    frame_ok = (ids[start] == question_id) & (ids[start + 1] == colon_id) & (ids[context + 1] == colon_id)
    frame_ok &= (ids[end - 2] == answer_id) & (ids[end - 1] == colon_id) & (context + 2 < end - 2)
    if not frame_ok.all():
      raise IllDefined(f"problem {int(np.argmin(frame_ok))}: expected "
                       "'Question : ... Context : <statements> Answer :'")
    # Regions: 0 frame, 1 question, 2 statements.
    segments = np.stack([np.full(batch, 2), context - start - 2, np.full(batch, 2),
                         end - context - 4, np.full(batch, 2)], axis=1)
    region = np.repeat(np.tile(np.array([0, 1, 0, 2, 0], np.int8), batch), segments.ravel())
    in_question, in_body = region == 1, region == 2

    # Quantities: runs of content words, possibly joined by a link word.
    content = (k == PLACE) | (k == WORD)
    inside = content | ((k == LINK) & _shift(content, 1) & _shift(content, -1))
    starts = inside & ~_shift(inside, 1)
    mention = np.cumsum(starts, dtype=np.int32) - 1
    count = int(mention[-1]) + 1 if len(mention) else 0
    place_at = np.flatnonzero(k == PLACE)
    if np.any(np.bincount(mention[place_at], minlength=count) != 1):
      bad = int(np.flatnonzero(np.bincount(mention[place_at], minlength=count) != 1)[0])
      raise IllDefined(f"problem {int(problem_of(np.flatnonzero(starts)[bad]))}: a quantity needs "
                       "exactly one place name")
    word_at = np.flatnonzero(k == WORD)
    start_at = np.flatnonzero(starts)
    words_before = np.cumsum(k == WORD, dtype=np.int32) - (k == WORD)
    rank = words_before[word_at] - words_before[start_at][mention[word_at]]
    if rank.size and rank.max() >= MAX_WORDS:
      raise IllDefined(f"a quantity has at most {MAX_WORDS} words besides its place")
    key = problem_of(start_at).astype(np.int64) << ((MAX_WORDS + 1) * self.bits)
    key[mention[place_at]] |= ids[place_at].astype(np.int64) << (MAX_WORDS * self.bits)
    for r in range(MAX_WORDS):  # a quantity has at most one word of each rank
      at = word_at[rank == r]
      key[mention[at]] |= ids[at].astype(np.int64) << (self.bits * r)

    # Items (quantities and numbers) in order, each with its problem and region.
    item_at = np.flatnonzero(starts | (k == NUMBER))
    item_is_quantity = starts[item_at]
    item = np.where(item_is_quantity, 0, value[ids[item_at]])
    item[item_is_quantity] = key

    question_items = in_question[item_at]
    if np.any(np.bincount(problem_of(item_at[question_items & item_is_quantity]), minlength=batch) != 1):
      raise IllDefined("every question must name exactly one quantity")
    self.asked = item[question_items & item_is_quantity]  # [batch] keys, in problem order

    # Statements: one per ".", holding two items (a value) or three (an operation).
    ends = (k == END) & in_body
    if not np.all(ends[end - 3]):
      raise IllDefined("every problem's statements must end with '.'")
    sentence_of = np.cumsum(ends, dtype=np.int32) - ends
    end_at = np.flatnonzero(ends)
    n = len(end_at)
    self.example = problem_of(end_at)  # [n] the problem of each statement
    self.num_statements = np.bincount(self.example, minlength=batch)
    body_items = in_body[item_at]
    item_sentence = sentence_of[item_at[body_items]]
    is_quantity, item = item_is_quantity[body_items], item[body_items]
    per_sentence = lambda code: np.bincount(sentence_of[(k == code) & in_body], minlength=n) > 0
    has = {code: per_sentence(code) for code in (ADD, SUB, MUL, LAST, LESS)}
    has[SUB] |= has[LESS]  # "less" subtracts, with its operands swapped (below)
    self.op = has[ADD] * 1 + has[SUB] * 2 + has[MUL] * 3  # [n] index into OPS
    size = np.bincount(item_sentence, minlength=n)
    quantities = np.bincount(item_sentence, weights=is_quantity, minlength=n)
    bad = (has[ADD].astype(int) + has[SUB] + has[MUL] > 1) | (quantities < 1)
    bad |= size != np.where(self.op > 0, 3, 2)
    if bad.any():
      s = int(np.argmax(bad))
      e = int(self.example[s])
      raise IllDefined(f"problem {e}: cannot read statement {s - int(np.searchsorted(self.example, e))}")
    slot = np.minimum(np.searchsorted(item_sentence, np.arange(n))[:, None] + np.arange(3), len(item) - 1)
    slot_quantity = is_quantity[slot] & (np.arange(3) < size[:, None])  # [n 3]
    slot_item = item[slot]
    first_q = np.argmax(slot_quantity, axis=1)
    last_q = 2 - np.argmax(slot_quantity[:, ::-1], axis=1)
    defined_slot = np.where(has[LAST], last_q, first_q)
    self.defined = slot_item[np.arange(n), defined_slot]  # [n] keys
    others = np.argsort(np.where(np.arange(3) == defined_slot[:, None], 9, np.arange(3)), axis=1)[:, :2]
    others = np.where(has[LESS][:, None], others[:, ::-1], others)  # "A is 3 less than B": B - 3
    self.operand = np.take_along_axis(slot_item, others, axis=1)  # [n 2] keys or numbers
    self.operand_is_quantity = np.take_along_axis(slot_quantity, others, axis=1)
    if np.any((self.op == 0) & self.operand_is_quantity[:, 0]):
      raise IllDefined("a value statement needs one number")

  def name(self, key: int) -> Quantity:
    mask = (1 << self.bits) - 1
    words = [self.vocab[(key >> (self.bits * r)) & mask] for r in range(MAX_WORDS + 1)]
    place, rest = words[MAX_WORDS], words[:MAX_WORDS]
    return (place,) + tuple(w for w in rest if w != self.vocab[0])

  def problem(self, key: int) -> int:
    return key >> ((MAX_WORDS + 1) * self.bits)


def _solve(problems: _Problems, modulus: int):
  """Resolves references and evaluates: (answer [B], ops [B], values, level, ref, needed, asked)."""
  p, n = problems, len(problems.defined)
  order = np.argsort(p.defined, kind="stable")
  sorted_keys = p.defined[order]
  twice = sorted_keys[1:] == sorted_keys[:-1]
  if twice.any():
    key = int(sorted_keys[1:][twice][0])
    raise IllDefined(f"problem {p.problem(key)}: {p.name(key)} is defined twice")

  def resolve(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = np.minimum(np.searchsorted(sorted_keys, keys), max(n - 1, 0))
    return order[where], sorted_keys[where] == keys

  ref, found = resolve(p.operand)
  if np.any(p.operand_is_quantity & ~found):
    key = int(p.operand[p.operand_is_quantity & ~found][0])
    raise IllDefined(f"problem {p.problem(key)}: {p.name(key)} is used but never defined")
  ref = np.where(p.operand_is_quantity, ref, -1)  # the defining statement of each operand

  values = np.full(n, -1, np.int64)  # -1: not known yet; every number in the text is >= 0
  level = np.full(n, -1, np.int64)
  pending = np.arange(n)
  ref_or_0 = np.maximum(ref, 0)
  for depth in range(n + 1):  # each round evaluates the statements whose operands are known
    arg = np.where(p.operand_is_quantity[pending], values[ref_or_0[pending]], p.operand[pending])
    ready = arg.min(axis=1) >= 0
    if not ready.any():
      break
    done, a, b = pending[ready], arg[ready, 0], arg[ready, 1]
    o = p.op[done]
    values[done] = np.where(o == 0, a, np.where(o == 1, a + b, np.where(o == 2, a - b, a * b))) % modulus
    level[done] = depth
    pending = pending[~ready]
  if pending.size:
    key = int(p.defined[pending[0]])
    raise IllDefined(f"problem {p.problem(key)}: {p.name(key)} depends on itself")

  asked, found = resolve(p.asked)
  if not found.all():
    key = int(p.asked[~found][0])
    raise IllDefined(f"problem {p.problem(key)}: {p.name(key)} is asked but never defined")
  needed = np.zeros(n, bool)
  frontier = asked
  while frontier.size:  # walk up the references from each question
    needed[frontier] = True
    parents = ref[frontier].ravel()
    frontier = np.unique(parents[(parents >= 0) & ~needed[np.maximum(parents, 0)]])
  ops = np.bincount(p.example[needed & (p.op > 0)], minlength=len(p.asked))
  return values[asked], ops, values, level, ref, needed, asked


def solve_batch(tokens: np.ndarray, lengths: np.ndarray, vocab: Sequence[str],
                modulus: int) -> tuple[np.ndarray, np.ndarray]:
  """Answers and operation counts of a batch of problems: tokens int [B T] (each problem in
  its first ``lengths[b]`` positions), token ids of ``vocab``. Returns (answer [B], ops [B]).

  Raises IllDefined, naming the problem, if any problem is not well defined.
  """
  problems = _Problems(np.asarray(tokens), np.asarray(lengths, np.int64), tuple(vocab))
  answer, ops, *_ = _solve(problems, modulus)
  return answer, ops


def solve_tokens(tokens: Sequence[int], vocab: Sequence[str], modulus: int) -> Solution:
  """One problem given as token ids (no padding), with the chain of quantities it needs."""
  tokens = np.asarray(tokens)[None]
  problems = _Problems(tokens, np.array([tokens.shape[1]]), tuple(vocab))
  answer, ops, values, level, ref, needed, asked = _solve(problems, modulus)
  chain = sorted(np.flatnonzero(needed).tolist(), key=lambda s: (level[s], s))
  name = {s: problems.name(int(problems.defined[s])) for s in chain}
  definitions = {}
  for s in chain:
    operands = tuple(name[int(r)] if r >= 0 else int(v)
                     for r, v in zip(ref[s], problems.operand[s]))
    definitions[name[s]] = Definition(OPS[problems.op[s]], operands[:1 if problems.op[s] == 0 else 2])
  return Solution(
      question=name[int(asked[0])], answer=int(answer[0]), ops=int(ops[0]),
      chain=tuple(name[s] for s in chain), definitions=definitions,
      values={name[s]: int(values[s]) for s in chain}, num_statements=int(problems.num_statements[0]))


def solve(words: Sequence[str], modulus: int) -> Solution:
  """One problem given as words (no padding)."""
  vocab = ("",) + tuple(sorted(set(words)))  # word 0 stands for "no word" in quantity keys
  index = {w: i for i, w in enumerate(vocab)}
  return solve_tokens([index[w] for w in words], vocab, modulus)
