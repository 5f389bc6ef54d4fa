"""Reusable pieces of the trainer: the train state, FLOP accounting, and metric logs.

The training loop itself lives in `experiments/train.py`; what is here has no opinion on configs:

* `TrainState`: the pytree a checkpoint holds (step, parameter weights, optimiser state, rng);
* `train_flops_per_example`: model FLOPs of one training example under Algorithm 1 (used for the
  compute-matched baseline and for throughput in FLOP/s);
* `MetricsLog`: `metrics.jsonl` (one JSON object per line) plus TensorBoard event files;
* `format_duration`, `flatten_eval`: small helpers for the console line and the metric names.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
from absl import logging
from etils import epath

from sleep_jax.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue: the step count (int32 scalar), the model's
  parameter weights (`Params.weights`), the optimiser state and an rng key (uint32 [2]; kept for
  stochastic extensions, the objective itself is deterministic)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------- FLOPs


def delta_rule_flops_per_token_head(rule: str, dk: int, dv: int, chunk: int) -> int:
  """Matmul FLOPs of the chunked fast-weight op per token per head (docs/delta_rule.md):
  `6 Dk Dv + C (6 Dk + 4 Dv)` for the gated delta rule, `4 Dk Dv + 2 C (Dk + Dv)` for the
  Hebbian rule; a single token (decode step) costs `6 Dk Dv` or `4 Dk Dv`."""
  if chunk <= 1:
    return (6 if rule == "gated_delta" else 4) * dk * dv
  if rule == "gated_delta":
    return 6 * dk * dv + chunk * (6 * dk + 4 * dv)
  return 4 * dk * dv + 2 * chunk * (dk + dv)


def forward_flops_per_token(config: ModelConfig, context: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one pass of the block stack, per token.

  `context` is the number of keys each attention query is scored against as computed (the whole
  run of tokens of the pass plus any cached prefix: XLA computes the full rectangle).
  """
  m, h, d = config.d_model, config.num_heads, config.resolved_head_dim
  total = 0.0
  for mixer, has_mlp in config.block_kinds:
    if mixer == "attention":
      total += 2 * m * h * d * 4          # q, k, v, o projections
      total += 2 * 2 * context * h * d    # scores and weighted values
    else:
      total += 2 * m * h * d * 5          # fused qkv (3), output gate, o
      total += 2 * m * h * 2              # beta and alpha gates
      total += h * delta_rule_flops_per_token_head(
          config.rule, d, d, min(config.resolved_chunk_size, context))
    if has_mlp:
      total += 2 * m * config.resolved_mlp_dim * 3
  return total


def train_flops_per_example(config: ModelConfig, consolidation_windows: Sequence[bool], n: int,
                            seq_len: Optional[int] = None) -> float:
  """Model FLOPs of one training example: 3 x the forward FLOPs (backward = 2 x forward).

  Forward: every consolidation window costs n passes over its L tokens, every prediction window one
  pass plus the output head. With eviction "none" the whole sequence is one pass (the head over all
  T positions). Rematerialisation (an extra forward) is not counted: it is the same fraction of
  every N, so ratios between runs are unaffected.
  """
  L, vocab, m = config.window, config.vocab_size, config.d_model
  head = 2 * m * vocab
  if config.eviction == "none":
    t = seq_len if seq_len is not None else L * len(consolidation_windows)
    return 3.0 * t * (forward_flops_per_token(config, t) + head)
  context = L if config.eviction == "hard" else 2 * L - 1
  block = forward_flops_per_token(config, context)
  forward = 0.0
  for consolidation in consolidation_windows:
    forward += L * (n * block if consolidation else block + head)
  return 3.0 * forward


def compute_matched_steps(steps: int, config: ModelConfig, consolidation_windows: Sequence[bool],
                          n: int, match_n: int) -> int:
  """Steps at `n` passes whose training FLOPs equal `steps` steps at `match_n` passes."""
  ratio = (train_flops_per_example(config, consolidation_windows, match_n)
           / train_flops_per_example(config, consolidation_windows, n))
  return int(math.ceil(steps * ratio))


# ----------------------------------------------------------------------------- metric logs


def flatten_eval(results: Mapping[str, Mapping[str, float]], prefix: str = "eval") -> dict:
  """`{"k=4": {"accuracy": ..}}` -> `{"eval/k=4/accuracy": ..}`."""
  return {f"{prefix}/{group}/{name}": value
          for group, metrics in results.items() for name, value in metrics.items()}


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


class MetricsLog:
  """`<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>`, written by process 0 only.

  On resume from step s, lines for steps after s (from the interrupted run) are dropped and
  TensorBoard is told to purge events after s, so both logs read as one uninterrupted run.
  Remote paths (e.g. `gs://`) cannot be appended to: the file is rewritten at every `flush`.
  """

  FILENAME = "metrics.jsonl"

  def __init__(self, workdir, *, resume_step: int = 0, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / self.FILENAME
    self._lines: list[str] = []
    self._pending: list[str] = []
    self._writer = None
    if not self.enabled:
      return
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        if line.strip() and json.loads(line).get("step", 0) <= resume_step:
          kept.append(line)
      self._lines = kept
      self.path.write_text("".join(line + "\n" for line in kept))
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._writer = SummaryWriter(str(self.path.parent),
                                     purge_step=resume_step + 1 if resume_step else None)
      except Exception as error:  # noqa: BLE001 - logging must never stop training
        logging.warning("TensorBoard logging disabled: %s", error)

  @property
  def records(self) -> list[dict]:
    """Every record written so far (including those kept from before a resume)."""
    return [json.loads(line) for line in self._lines]

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (it must have an int `step`); numbers go to TensorBoard as scalars."""
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    line = json.dumps(record, sort_keys=False)
    self._lines.append(line)
    self._pending.append(line)
    if self._writer is not None:
      step = int(record["step"])
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          # TensorBoard tags allow no "=": eval/k=4/accuracy is shown as eval/k_4/accuracy.
          self._writer.add_scalar(key.replace("=", "_"), value, step)

  def flush(self) -> None:
    if not self.enabled:
      return
    if self._pending:
      if _is_local(self.path):
        with self.path.open("a") as f:
          f.write("".join(line + "\n" for line in self._pending))
      else:
        self.path.write_text("".join(line + "\n" for line in self._lines))
      self._pending = []
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    self.flush()
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _plain(value):
  """numpy / jax scalars -> Python numbers (JSON has no NaN: non-finite floats become strings)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value
