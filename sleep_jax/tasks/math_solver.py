"""Solves the math task's word problems from their words alone, to verify every generated problem.

The solver knows the grammar words of the problem language (operators, linking words, sentence
structure) but not the lexicon: a quantity is any run of content words joined by ``in``, ``at`` or
``'s``, keyed by its capitalised place name and its other words. It never sees the generator's
dependency graph, so a problem is emitted only if this reading of the text agrees with the
generator: every quantity defined exactly once, every reference defined, no cycles, and the same
answer and number of operations.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

# Words that structure sentences; any other non-number word is content (part of a quantity).
LINK_WORDS = frozenset({"in", "at", "'s"})
OPERATOR_WORDS = {
    "add": frozenset({"plus", "sum", "more", "together"}),
    "sub": frozenset({"minus", "difference", "less"}),
    "mul": frozenset({"times", "product"}),
}
DEFINED_LAST = frozenset({"gives", "make"})  # "B plus C gives A": the defined quantity comes last
GRAMMAR_WORDS = frozenset({
    "the", "number", "of", "count", "is", "equals", "there", "are", "and", "than",
    "between", "what", "how", "many", "find", "Question", "Context", "Answer", ":", "?", ".",
}) | LINK_WORDS | DEFINED_LAST | frozenset().union(*OPERATOR_WORDS.values())

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
    ops: int  # derived quantities among the question's ancestors, itself included
    chain: tuple  # the question's ancestors in evaluation order
    definitions: dict
    values: dict


def _quantity(words: Sequence[str]) -> Quantity:
    places = [w for w in words if w[:1].isupper()]
    if len(places) != 1:
        raise IllDefined(f"a quantity needs exactly one place name: {' '.join(words)!r}")
    return (places[0],) + tuple(w for w in words if not w[:1].isupper() and w not in LINK_WORDS)


def _parse_sentence(words: Sequence[str]) -> tuple[list, set[str]]:
    """Mentions (quantities) and numbers in textual order, and the set of grammar words present."""
    items: list = []  # quantities and ints in textual order
    grammar: set[str] = set()
    current: list[str] = []

    def close():
        if current:
            items.append(_quantity(current))
            current.clear()

    for i, word in enumerate(words):
        if word.isdigit():
            close()
            items.append(int(word))
        elif word in LINK_WORDS:
            # A link word joins content words on both sides into one mention.
            nxt = words[i + 1] if i + 1 < len(words) else None
            if not current or nxt is None or nxt in GRAMMAR_WORDS or nxt.isdigit():
                close()
                grammar.add(word)
            else:
                current.append(word)
        elif word in GRAMMAR_WORDS:
            close()
            grammar.add(word)
        else:
            current.append(word)
    close()
    return items, grammar


def _parse_statement(words: Sequence[str]) -> tuple[Quantity, Definition]:
    items, grammar = _parse_sentence(words)
    ops = [op for op, keys in OPERATOR_WORDS.items() if grammar & keys]
    text = " ".join(words)
    if not any(isinstance(i, tuple) for i in items) or len(ops) > 1:
        raise IllDefined(f"cannot read statement {text!r}")
    positions = [i for i, item in enumerate(items) if isinstance(item, tuple)]
    at = positions[-1] if grammar & DEFINED_LAST else positions[0]
    defined, operands = items[at], items[:at] + items[at + 1:]
    if not ops:
        if len(operands) != 1 or not isinstance(operands[0], int):
            raise IllDefined(f"a value statement needs one number: {text!r}")
        return defined, Definition("value", (operands[0],))
    if len(operands) != 2:
        raise IllDefined(f"an operation needs two operands: {text!r}")
    if ops[0] == "sub" and "less" in grammar:  # "A is 3 less than B": B - 3
        operands.reverse()
    return defined, Definition(ops[0], tuple(operands))


def _split(words: Sequence[str], enders: str) -> list[list[str]]:
    sentences, current = [], []
    for word in words:
        current.append(word)
        if word in enders:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def solve(words: Sequence[str], modulus: int) -> Solution:
    """Reads a problem (its words, padding excluded) and computes the answer modulo ``modulus``.

    Expected shape: ``Question : ... ? Context : <statements> Answer :``.
    """
    words = list(words)
    try:
        context_at = words.index("Context")
        answer_at = words.index("Answer")
    except ValueError:
        raise IllDefined("missing Context or Answer marker") from None
    if words[:2] != ["Question", ":"] or words[context_at + 1] != ":" or words[answer_at:] != ["Answer", ":"]:
        raise IllDefined("expected 'Question : ... Context : ... Answer :'")
    asked = [i for i in _parse_sentence(words[2:context_at])[0] if isinstance(i, tuple)]
    if len(asked) != 1:
        raise IllDefined("the question must name exactly one quantity")
    question = asked[0]

    definitions: dict[Quantity, Definition] = {}
    for sentence in _split(words[context_at + 2:answer_at], "."):
        if sentence[-1] != ".":
            raise IllDefined("unterminated statement")
        quantity, definition = _parse_statement(sentence[:-1])
        if quantity in definitions:
            raise IllDefined(f"{quantity} is defined twice")
        definitions[quantity] = definition

    values: dict[Quantity, int] = {}
    chain: list[Quantity] = []
    visiting: set[Quantity] = set()

    def evaluate(quantity: Quantity) -> int:
        # Iterative depth-first evaluation: chains may be longer than Python's recursion limit.
        stack = [(quantity, False)]
        while stack:
            q, expanded = stack.pop()
            if q in values:
                continue
            if q not in definitions:
                raise IllDefined(f"{q} is used but never defined")
            deps = [o for o in definitions[q].operands if isinstance(o, tuple)]
            if not expanded:
                if q in visiting:
                    raise IllDefined(f"{q} depends on itself")
                visiting.add(q)
                stack.append((q, True))
                stack.extend((d, False) for d in deps if d not in values)
                continue
            args = [values[o] if isinstance(o, tuple) else o for o in definitions[q].operands]
            op = definitions[q].op
            if op == "value":
                result = args[0]
            elif op == "add":
                result = args[0] + args[1]
            elif op == "sub":
                result = args[0] - args[1]
            else:
                result = args[0] * args[1]
            values[q] = result % modulus
            visiting.discard(q)
            chain.append(q)
        return values[quantity]

    answer = evaluate(question)
    needed = tuple(chain)
    for q in definitions:  # the whole text must be well defined, not just the answer's chain
        evaluate(q)
    ops = sum(definitions[q].op != "value" for q in needed)
    return Solution(question, answer, ops, needed, definitions, values)
