"""The interface every task shares: static window layout, random-access examples, evaluation.

A task is a frozen dataclass of its parameters. Everything else (vocabulary, window layout, test
split) is derived from them, and an example is a pure function of ``(parameters, split, index)``.

Conventions shared by all tasks:

- token id = index into ``vocab``; ``"<pad>"`` has id 0;
- ``seq_len`` (T) is a multiple of ``window`` (L): sequences are padded at the end with ``<pad>``;
- ``targets[i]`` is the token to predict *at* position i (no shift): at a query position the target
  is the answer itself, and ``loss_mask`` marks exactly the supervised positions;
- ``consolidation_windows[j]`` is True when window j has no supervised position in any example
  (the model sleeps on it), False for prediction windows.
"""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np

from sleep_jax.tasks import randomness

PAD = "<pad>"
TRAIN_INDEX_BITS = 40  # train indices live in [0, 2**40): far more than any run consumes
SPLITS = randomness.SPLITS

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------------


def check_int(task: str, name: str, value: Any, low: int, high: int) -> int:
  """Returns ``value`` as an int if it is an integer in [low, high], else raises ValueError."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
    raise ValueError(
        f"{task} parameter '{name}' must be an integer in [{low}, {high}], got {value!r}"
    )
  return int(value)


def check_int_tuple(task: str, name: str, value: Any, low: int, high: int, *,
                    length: int | None = None, ordered: bool = False) -> tuple[int, ...]:
  """Validates a tuple of integers in [low, high] (fixed ``length``, non-decreasing if ``ordered``)."""
  what = "a pair (low, high)" if length == 2 else "a non-empty tuple of integers"
  problem = not isinstance(value, (tuple, list)) or not value
  problem = problem or (length is not None and len(value) != length)
  if not problem:
    try:
      values = tuple(check_int(task, name, v, low, high) for v in value)
    except ValueError:
      problem = True
    else:
      problem = ordered and any(a > b for a, b in zip(values, values[1:]))
  if problem:
    order = " with low <= high" if ordered else ""
    raise ValueError(
        f"{task} parameter '{name}' must be {what} of integers in [{low}, {high}]{order}, "
        f"got {value!r}"
    )
  return values


def parse_param(task_cls: type, name: str, text: str) -> Any:
  """Parses a command-line string into the type of ``task_cls``'s parameter ``name``.

  Integers stay integers, tuples are written ``1,16`` (or ``1-16`` for pairs), ``none`` is None.
  """
  fields = {f.name: f for f in dataclasses.fields(task_cls)}
  if name not in fields:
    raise ValueError(
        f"{task_cls.name} has no parameter '{name}'; valid parameters: {sorted(fields)}"
    )
  kind = fields[name].metadata.get("kind", "int")
  text = text.strip()
  if text.lower() == "none":
    return None
  try:
    if kind == "int":
      return int(text)
    if kind == "tuple":
      parts = text.replace("-", ",").strip("()[] ").split(",")
      return tuple(int(p) for p in parts if p.strip())
  except ValueError:
    raise ValueError(f"{task_cls.name} parameter '{name}': cannot parse {text!r} as {kind}") from None
  return text


# ---------------------------------------------------------------------------------------------
# The task interface
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
  """Base class of the procedural tasks. Subclasses are frozen dataclasses of their parameters.

  Subclasses set the class attributes ``name`` and ``group_name``, call ``_set_layout`` from
  ``__post_init__`` and implement ``_generate``.
  """

  name: ClassVar[str]
  group_name: ClassVar[str]

  # Derived in __post_init__ via _set_layout (not parameters).
  vocab: list[str] = dataclasses.field(init=False, repr=False, compare=False)
  seq_len: int = dataclasses.field(init=False, repr=False, compare=False)
  consolidation_windows: tuple[bool, ...] = dataclasses.field(init=False, repr=False, compare=False)
  groups: list[int] = dataclasses.field(init=False, repr=False, compare=False)
  chance: dict[str, float] = dataclasses.field(init=False, repr=False, compare=False)

  def _set_layout(self, *, vocab: list[str], seq_len: int, consolidation_windows: Sequence[bool],
                  groups: Sequence[int], chance: dict[str, float]) -> None:
    assert vocab[0] == PAD and len(set(vocab)) == len(vocab), "vocab: <pad> first, no duplicates"
    assert seq_len % self.window == 0 and seq_len // self.window == len(consolidation_windows)
    set_ = object.__setattr__  # the dataclass is frozen; these are derived once, here
    set_(self, "vocab", list(vocab))
    set_(self, "seq_len", int(seq_len))
    set_(self, "consolidation_windows", tuple(bool(c) for c in consolidation_windows))
    set_(self, "groups", [int(g) for g in groups])
    set_(self, "chance", dict(chance))
    set_(self, "_token_ids", {tok: i for i, tok in enumerate(vocab)})
    set_(self, "_key", randomness.task_key(self.name, self.content_params()))

  # ----- parameters ------------------------------------------------------------------------

  def params(self) -> dict[str, Any]:
    """The task's parameters (after defaults are resolved), enough to rebuild it with ``get``."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

  def content_params(self) -> dict[str, Any]:
    """The parameters that define example content: all but the size of the test split.

    Test example i does not depend on ``num_test``, so a larger test split extends a smaller one.
    """
    params = self.params()
    params.pop("num_test", None)
    return params

  def config_name(self) -> str:
    """A file-system-safe name of the parameters, e.g. ``t-32_width-24_..._eval_hops-1.2.4``."""
    return "_".join(f"{key}-{_fmt(value, '.')}" for key, value in self.params().items())

  # ----- layout ----------------------------------------------------------------------------

  @property
  def num_windows(self) -> int:
    return self.seq_len // self.window

  def token_id(self, token: str) -> int:
    return self._token_ids[token]

  def decode(self, tokens: Iterable[int]) -> list[str]:
    """Token ids -> token strings."""
    return [self.vocab[int(t)] for t in tokens]

  # ----- examples --------------------------------------------------------------------------

  def split_size(self, split: str) -> int:
    """Number of examples in ``split`` (the train split is effectively infinite)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return self.num_test if split == "test" else 1 << TRAIN_INDEX_BITS

  def examples(self, split: str, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """A batch of examples, generated together (vectorised).

    Returns ``tokens`` int32 [b T], ``targets`` int32 [b T], ``loss_mask`` bool [b T],
    ``group`` int32 [b], ``index`` int64 [b].
    """
    size = self.split_size(split)
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(f"indices must be a 1-d sequence of integers, got shape {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= size):
      bad = indices[(indices < 0) | (indices >= size)][0]
      raise ValueError(f"index must be in [0, {size}) for split '{split}', got {bad}")
    if not indices.size:
      return dict(self.empty_batch(0), group=np.zeros(0, np.int32), index=indices)
    keys = randomness.example_keys(self._key, split, indices)
    batch = self._generate(split, indices, keys)
    batch["index"] = indices
    return batch

  def example(self, split: str, index: int) -> dict[str, Any]:
    """One example: ``tokens``, ``targets`` (int32 [T]), ``loss_mask`` (bool [T]), ``group`` (int)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise ValueError(f"index must be an integer, got {index!r}")
    batch = self.examples(split, [index])
    example = {k: v[0] for k, v in batch.items()}
    example["group"] = int(example["group"])
    example["index"] = int(example["index"])
    return example

  def _generate(self, split: str, indices: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
    """Subclasses: tokens/targets/loss_mask [b T] and group [b] for per-example ``keys`` [b]."""
    raise NotImplementedError

  def empty_batch(self, size: int) -> dict[str, np.ndarray]:
    """An all-pad batch to fill in: tokens, targets, loss_mask [size T]."""
    return {
        "tokens": np.zeros((size, self.seq_len), np.int32),
        "targets": np.zeros((size, self.seq_len), np.int32),
        "loss_mask": np.zeros((size, self.seq_len), bool),
    }

  # ----- evaluation ------------------------------------------------------------------------

  def evaluate(self, score_fn: ScoreFn, *, split: str = "test", num_examples: int | None = None,
               batch_size: int = 64, data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Scores a model on a split and returns metrics per difficulty group and overall.

    ``score_fn(tokens, targets, loss_mask)`` takes numpy [B T] arrays and returns
    ``(predictions int [B T], token_loss float [B T])``. Every call gets exactly ``batch_size``
    rows (the last batch is padded with rows whose loss mask is empty; they are not counted), so
    a jitted ``score_fn`` compiles once. ``data_dir`` reads a split built by
    ``python -m sleep_jax.tasks.build``; without it the split is generated (identical content).

    Returns ``{"<group_name>=<g>": metrics, ..., "all": metrics}`` where metrics holds
    ``accuracy`` (per supervised token), ``exact`` (fraction of examples with every supervised
    token right), ``loss`` (mean token loss over supervised tokens) and ``count`` (examples).
    """
    from sleep_jax import data  # the Grain pipeline; imported here so tasks stand alone

    batches = data.eval_batches(self, batch_size, split=split, num_examples=num_examples,
                                data_dir=data_dir)
    return aggregate_metrics(self, score_fn, batches)

  # ----- viewing ---------------------------------------------------------------------------

  def describe(self, example: dict[str, Any], *, color: bool = False, width: int | None = None) -> str:
    """A readable rendering of an example: windows marked, supervised answers highlighted."""
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    style = _Style(color)
    lines = [style.bold(f"{self.name}  " + "  ".join(f"{k}={_fmt(v)}" for k, v in self.params().items()))]
    num_pred = self.consolidation_windows.count(False)
    lines.append(
        f"T={self.seq_len}  L={self.window}  {self.num_windows} windows "
        f"({self.num_windows - num_pred} consolidation, {num_pred} prediction)  "
        f"vocab={len(self.vocab)}"
    )
    if "index" in example:
      lines.append(f"example {example['index']}  {self.group_name}={int(example['group'])}")
    rendered = self.render_tokens(example, style)
    for w, consolidation in enumerate(self.consolidation_windows):
      start, stop = w * self.window, (w + 1) * self.window
      kind = "consolidation (sleep)" if consolidation else "prediction (wake)"
      head = f"── window {w} · {kind} · positions {start}..{stop - 1} "
      lines.append(style.dim(head + "─" * max(0, width - len(head))))
      lines.extend(self.layout_window(rendered[start:stop], width))
    lines.append(style.dim("─" * width))
    lines.extend(self.explain(example))
    return "\n".join(lines)

  def render_tokens(self, example: dict[str, Any], style: "_Style") -> list[str]:
    """Token strings, supervised positions shown as ``[input→answer]``."""
    out = []
    for tok, tgt, supervised in zip(example["tokens"], example["targets"], example["loss_mask"]):
      text = self.vocab[int(tok)]
      if supervised:
        text = "[" + text + "→" + style.answer(self.vocab[int(tgt)]) + "]"
      out.append(text)
    return out

  def layout_window(self, tokens: list[str], width: int) -> list[str]:
    """Lines for one window's rendered tokens; runs of padding are collapsed."""
    return textwrap.wrap(" ".join(collapse_pads(tokens)), width=width, break_on_hyphens=False) or [""]

  def explain(self, example: dict[str, Any]) -> list[str]:
    """Task-specific lines after the windows (e.g. the answers and how they follow)."""
    return []


def _fmt(value: Any, sep: str = ",") -> str:
  if isinstance(value, (tuple, list)):
    return sep.join(str(v) for v in value)
  return str(value)


def collapse_pads(tokens: list[str]) -> list[str]:
  """Token strings with every run of padding replaced by one ``<pad>×n``."""
  out, run = [], 0
  for tok in tokens + [None]:
    if tok == PAD:
      run += 1
      continue
    if run:
      out.append(PAD if run == 1 else f"{PAD}×{run}")
      run = 0
    if tok is not None:
      out.append(tok)
  return out


class _Style:
  """ANSI styling when writing to a terminal, plain text otherwise."""

  def __init__(self, color: bool):
    self.color = color

  def _wrap(self, code: str, text: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

  def bold(self, text: str) -> str:
    return self._wrap("1", text)

  def dim(self, text: str) -> str:
    return self._wrap("2", text)

  def answer(self, text: str) -> str:
    return self._wrap("1;32", text)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def aggregate_metrics(task: Task, score_fn: ScoreFn,
                      batches: Iterator[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
  """Runs ``score_fn`` over eval batches (with ``valid`` and ``group`` keys) and groups metrics."""
  sums: dict[int, np.ndarray] = {}  # group -> [correct tokens, tokens, exact examples, loss, examples]
  for batch in batches:
    predictions, token_loss = score_fn(batch["tokens"], batch["targets"], batch["loss_mask"])
    predictions, token_loss = np.asarray(predictions), np.asarray(token_loss, np.float64)
    mask = batch["loss_mask"]
    correct = (predictions == batch["targets"]) & mask
    per_example = np.stack([
        correct.sum(1), mask.sum(1), (correct.sum(1) == mask.sum(1)),
        np.where(mask, token_loss, 0.0).sum(1), np.ones(len(mask)),
    ], axis=1).astype(np.float64)
    for group in np.unique(batch["group"][batch["valid"]]):
      rows = batch["valid"] & (batch["group"] == group)
      sums[int(group)] = sums.get(int(group), 0) + per_example[rows].sum(0)

  def metrics(s: np.ndarray) -> dict[str, float]:
    tokens = max(s[1], 1.0)
    return {"accuracy": float(s[0] / tokens), "exact": float(s[2] / max(s[4], 1.0)),
            "loss": float(s[3] / tokens), "count": int(s[4])}

  result = {f"{task.group_name}={g}": metrics(sums[g]) for g in sorted(sums)}
  result["all"] = metrics(sum(sums.values(), np.zeros(5)))
  return result
