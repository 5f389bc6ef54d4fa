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
lengths 3073-3300.

Every problem is checked by ``math_solver`` (which reads only the words) before it is returned.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np

from sleep_jax.tasks import base, math_solver

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
NUM_QUANTITIES = len(ADJECTIVES) * len(NOUNS) * len(PLACES)

# Templates. Slots: A is the defined quantity, B and C operand quantities, V a number, and
# A_BARE the defined quantity without article ("adult lions in Riverton").
MENTIONS = ("the number of ADJ NOUN in PLACE", "the count of ADJ NOUN at PLACE", "PLACE 's ADJ NOUN")
BARE_MENTION = "ADJ NOUN in PLACE"
QUESTIONS = ("Question : what is A ?", "Question : how many A_BARE are there ?",
             "Question : find A .")
STATEMENTS = {
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
SLOTS = {"A": -1, "B": -2, "C": -3, "V": -4, "A_BARE": -5, "ADJ": -6, "NOUN": -7, "PLACE": -8}


def _template_words() -> list[str]:
    """Every literal word of the templates, in first-appearance order (a stable vocabulary)."""
    texts = list(MENTIONS) + [BARE_MENTION] + list(QUESTIONS) + list(FRAME)
    texts += [t for group in STATEMENTS.values() for t in group]
    words: list[str] = []
    for text in texts:
        for word in text.split():
            if word not in SLOTS and word not in words:
                words.append(word)
    return words


SCALES = {
    "tiny": {"window": 32, "length": (100, 128), "ops": (1, 2)},
    "small": {"window": 128, "length": (400, 512), "ops": (1, 8)},
    "paper": {"window": 2000, "length": (2000, 3300), "ops": (1, 8)},
}


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
        if high - low < 16:
            raise ValueError(f"{task} parameter 'length' leaves too narrow a range ({low}..{high}) "
                             f"for window {window}: high must be in "
                             f"[{seq_len - window + 17}, {seq_len}] or beyond")
        worst = _worst_path_length(ops[1])
        if worst > high:
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
        ids = self._token_ids
        compile_ = lambda text: [SLOTS[w] if w in SLOTS else ids[w] for w in text.split()]
        set_(self, "_mentions", [compile_(m) for m in MENTIONS])
        set_(self, "_bare", compile_(BARE_MENTION))
        set_(self, "_questions", [compile_(q) for q in QUESTIONS])
        set_(self, "_statements", {k: [compile_(t) for t in v] for k, v in STATEMENTS.items()})
        set_(self, "_frame", [compile_(f) for f in FRAME])
        set_(self, "_content_ids", (
            [ids[w] for w in ADJECTIVES], [ids[w] for w in NOUNS], [ids[w] for w in PLACES]))
        set_(self, "_number0", ids["0"])

    # ----- generation ------------------------------------------------------------------------

    def _generate(self, split, indices, keys):
        batch = self.empty_batch(len(keys))
        low, high = self.ops
        if split == "test":
            ops = low + indices % (high - low + 1)
        else:  # uniform over the range, from the example's own key
            ops = low + ((keys >> np.uint64(40)) % np.uint64(high - low + 1)).astype(np.int64)
        for row, (key, n_ops) in enumerate(zip(keys, ops)):
            tokens, answer = self.problem(int(key), int(n_ops))
            batch["tokens"][row, :len(tokens)] = tokens
            batch["targets"][row, len(tokens) - 1] = self._number0 + answer
            batch["loss_mask"][row, len(tokens) - 1] = True
        batch["group"] = ops.astype(np.int32)
        return batch

    def problem(self, seed: int, ops: int) -> tuple[list[int], int]:
        """One verified problem: its token ids (ending in ``Answer :``) and the answer value."""
        rng = random.Random(seed)
        m = self.modulus
        used: set[int] = set()

        def new_quantity() -> int:
            while True:
                q = rng.randrange(NUM_QUANTITIES)
                if q not in used:
                    used.add(q)
                    return q

        # The answer's dependency tree: exactly `ops` derived quantities, built top-down.
        definitions: dict[int, tuple] = {}  # q -> (op, operand quantities, constant)
        answer = new_quantity()
        frontier, derived_order, bases = [answer], [], []
        budget = ops - 1
        while frontier:
            q = frontier.pop(rng.randrange(len(frontier)))
            derived_order.append(q)
            op = rng.choice(("add", "sub", "mul"))
            slots = 2 if rng.random() < 0.5 else 1
            operands: list[int] = []
            for slot in range(slots):
                # When q is the last open node (and no earlier slot opened one), its last operand
                # must carry the remaining budget onwards.
                must_derive = budget > 0 and not frontier and slot == slots - 1
                reusable = [b for b in bases if b not in operands]
                if budget > 0 and (must_derive or rng.random() < 0.5):
                    child = new_quantity()
                    frontier.append(child)
                    budget -= 1
                elif reusable and rng.random() < 0.25:
                    child = rng.choice(reusable)
                else:
                    child = new_quantity()
                    bases.append(child)
                operands.append(child)
            constant = None if slots == 2 else rng.randint(2 if op == "mul" else 1, m - 1)
            definitions[q] = (op, tuple(operands), constant)

        # Draw the base values; redraw while a product on the path has a zero factor, which would
        # make the answer independent of the other factor's whole subtree (a shortcut).
        while True:
            values: dict[int, int] = {b: rng.randrange(m) for b in bases}
            for q in reversed(derived_order):  # children were opened after their parents
                values[q] = _apply(definitions[q], values, m)
            if not any(definitions[q][0] == "mul" and 0 in [values[o] for o in definitions[q][1]]
                       for q in derived_order):
                break
        for b in bases:
            definitions[b] = ("value", (), values[b])

        statements = [self._render(q, definitions[q], rng) for q in derived_order + bases]
        question = self._render_with(rng.choice(self._questions), answer, (), None, rng)
        context_open, answer_marker = self._frame
        size = len(question) + len(context_open) + len(answer_marker) + sum(map(len, statements))
        low, high = self.length
        target = rng.randint(low, high)
        quantities = derived_order + bases
        while size < target:
            q = new_quantity()
            if rng.random() < 0.35:
                definition = ("value", (), rng.randrange(m))
            elif rng.random() < 0.5:
                definition = (rng.choice(("add", "sub", "mul")), tuple(rng.sample(quantities, 2)), None)
            else:
                op = rng.choice(("add", "sub", "mul"))
                definition = (op, (rng.choice(quantities),), rng.randint(2 if op == "mul" else 1, m - 1))
            statement = self._render(q, definition, rng)
            if size + len(statement) > high:  # fall back to the shortest statement form
                definition = ("value", (), rng.randrange(m))
                statement = self._render_with(self._statements[("value", False)][0], q, (),
                                              definition[2], rng, mention=self._mentions[2])
                if size + len(statement) > high:
                    break
            definitions[q] = definition
            values[q] = _apply(definition, values, m)
            quantities.append(q)
            statements.append(statement)
            size += len(statement)

        rng.shuffle(statements)
        tokens = question + context_open + [t for s in statements for t in s] + answer_marker
        self._verify(tokens, values[answer], ops)
        return tokens, values[answer]

    def _render(self, q: int, definition: tuple, rng: random.Random) -> list[int]:
        op, operands, constant = definition
        template = rng.choice(self._statements[(op, len(operands) == 2)])
        return self._render_with(template, q, operands, constant, rng)

    def _render_with(self, template: list[int], q: int, operands: tuple, constant: int | None,
                     rng: random.Random, mention: list[int] | None = None) -> list[int]:
        out: list[int] = []
        for tok in template:
            if tok >= 0:
                out.append(tok)
            elif tok == -4:
                out.append(self._number0 + constant)
            elif tok == -5:
                out.extend(self._fill(self._bare, q))
            else:  # A, B, C
                form = mention if mention is not None else self._mentions[rng.randrange(len(self._mentions))]
                out.extend(self._fill(form, q if tok == -1 else operands[-2 - tok]))
        return out

    def _fill(self, form: list[int], q: int) -> list[int]:
        adjectives, nouns, places = self._content_ids
        adj, rest = divmod(q, len(NOUNS) * len(PLACES))
        noun, place = divmod(rest, len(PLACES))
        parts = {-6: adjectives[adj], -7: nouns[noun], -8: places[place]}
        return [parts.get(t, t) for t in form]

    def _verify(self, tokens: list[int], answer: int, ops: int) -> None:
        low, high = self.length
        solution = math_solver.solve(self.decode(tokens), self.modulus)
        if solution.answer != answer or solution.ops != ops or not low <= len(tokens) <= high:
            raise RuntimeError(
                f"math generator disagrees with its solver: answer {answer} vs {solution.answer}, "
                f"ops {ops} vs {solution.ops}, length {len(tokens)} vs {self.length}")

    # ----- viewing ---------------------------------------------------------------------------

    def explain(self, example: dict[str, Any]) -> list[str]:
        words = [w for w in self.decode(example["tokens"]) if w != base.PAD]
        solution = math_solver.solve(words, self.modulus)
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
        stated = sum(1 for w in words if w == ".")
        lines.append(f"answer: {solution.answer}   ({len(solution.chain)} of {stated} statements "
                     f"needed; {len(words)} tokens)")
        return lines


def _apply(definition: tuple, values: dict[int, int], modulus: int) -> int:
    op, operands, constant = definition
    if op == "value":
        return constant
    a = values[operands[0]]
    b = values[operands[1]] if len(operands) == 2 else constant
    if op == "add":
        return (a + b) % modulus
    if op == "sub":
        return (a - b) % modulus
    return (a * b) % modulus


def _template_length(text: str) -> int:
    sizes = {"A": 7, "B": 7, "C": 7, "A_BARE": 4, "V": 1}  # 7: the longest mention form
    return sum(sizes.get(w, 1) for w in text.split())


def _worst_path_length(ops: int) -> int:
    """An upper bound on the tokens of a problem without distractors (question and frame too)."""
    longest_op = max(_template_length(t) for (op, _), group in STATEMENTS.items() if op != "value"
                     for t in group)
    longest_value = max(_template_length(t) for t in STATEMENTS[("value", False)])
    frame = max(_template_length(q) for q in QUESTIONS) + sum(_template_length(f) for f in FRAME)
    return frame + ops * longest_op + (ops + 1) * longest_value


def _max_ops(high: int) -> int:
    return max([n for n in range(1, 17) if _worst_path_length(n) <= high], default=0)
