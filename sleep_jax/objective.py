"""The training objective (the paper's Algorithm 1).

An example is `tokens`, `targets`, `loss_mask`, each `[b T]` with T a multiple of the window L. The
windows are processed in order with the fast-weight state starting at zero:

* a consolidation window (no supervised token) is slept on: n offline passes (`run_passes`);
* a prediction window gets one ordinary pass and masked cross-entropy on its supervised positions;
  the fast-weight recurrence keeps running through it.

Which windows are which is static (the task's layout): consecutive windows of one kind form one
`lax.scan` over windows. Gradients flow through every pass of every window (full BPTT, each pass
rematerialised per the config's policy) unless `grad_passes` truncates them.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import model as model_lib
from sleep_jax.model import Params

Array = jax.Array


def window_layout(loss_mask, num_windows: int, window: int) -> tuple[bool, ...]:
  """Consolidation flags per window from a concrete loss mask [b T]: True = nothing supervised."""
  try:
    mask = np.asarray(loss_mask)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(
        "loss: the window layout must be static under jit; pass consolidation_windows= (a tuple "
        "of bools, True for windows without supervised tokens; tasks provide it as "
        "task.consolidation_windows)") from None
  per_window = mask.reshape(mask.shape[0], num_windows, window).any(axis=(0, 2))
  return tuple(bool(not s) for s in per_window)


def _segments(layout: Sequence[bool]):
  """Runs of equal flags: [(consolidate, start, stop), ...]."""
  runs, start = [], 0
  for i in range(1, len(layout) + 1):
    if i == len(layout) or layout[i] != layout[start]:
      runs.append((layout[start], start, i))
      start = i
  return runs


def _token_stats(logits: Array, targets: Array, mask: Array):
  """Per-example sums over a window: (cross-entropy, correct, supervised, wrong)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  maskf = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets) & mask
  return (jnp.sum(nll * maskf, axis=1), jnp.sum(correct, axis=1).astype(jnp.float32),
          jnp.sum(maskf, axis=1), jnp.sum(mask & ~correct, axis=1).astype(jnp.float32))


def loss(params: Params, batch: dict, n: int, *,
         consolidation_windows: Optional[Sequence[bool]] = None,
         grad_passes: Optional[int] = None):
  """Mean masked cross-entropy of Algorithm 1 and metrics.

  Args:
    params: from `sleep_jax.init`.
    batch: dict with `tokens` int [b T], `targets` int [b T], `loss_mask` bool [b T].
    n: sleep passes on every consolidation window (static; n = 1 is the ordinary hybrid model).
    consolidation_windows: static tuple of bools per window (True: sleep on it). Derived from a
      concrete `loss_mask` when omitted; required under `jit`.
    grad_passes: truncated BPTT: gradients flow through the last `grad_passes` passes of each
      consolidation window only; the carry entering them is a constant. None: full BPTT.

  Returns:
    (loss, metrics) with metrics `loss`, `accuracy` (supervised tokens), `exact` (fraction of
    examples whose supervised tokens are all right) and `supervised_tokens`.
  """
  tokens, targets, mask, layout = _prepare("loss", params, batch, n, grad_passes,
                                           consolidation_windows)
  return _loss(params, tokens, targets, mask, n, layout, grad_passes)


def _prepare(fn, params, batch, n, grad_passes, consolidation_windows):
  """Validates the arguments of loss / score; returns tokens, targets, mask and the static layout."""
  model_lib._check_params(params)
  cfg = params.config
  tokens, targets, mask = _check_batch(fn, batch, cfg)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"{fn}: n (sleep passes per consolidation window) must be an int >= 1, "
                     f"got {n!r}")
  if grad_passes is not None and (isinstance(grad_passes, bool) or not isinstance(grad_passes, int)
                                  or not 1 <= grad_passes <= n):
    raise ValueError(f"{fn}: grad_passes must be None (full BPTT) or an int in [1, n={n}], "
                     f"got {grad_passes!r}")
  if cfg.eviction == "none":
    if n != 1:
      raise ValueError(f"{fn}: ModelConfig.eviction='none' has no boundary to sleep at; use n=1")
    return tokens, targets, mask, None
  L = cfg.window
  num_windows = tokens.shape[1] // L
  if consolidation_windows is None:
    consolidation_windows = window_layout(mask, num_windows, L)
  consolidation_windows = tuple(bool(c) for c in consolidation_windows)
  if len(consolidation_windows) != num_windows:
    raise ValueError(f"{fn}: consolidation_windows has {len(consolidation_windows)} entries but "
                     f"the batch has {num_windows} windows of {L} tokens")
  return tokens, targets, mask, consolidation_windows


def _process_windows(params, tokens, extras, n, consolidation_windows, grad_passes, readout):
  """Algorithm 1's loop over windows.

  Consolidation windows are slept on (n passes); prediction windows get one pass and
  `readout(logits [b L vocab], *extras_of_the_window)`. Returns `[(start, stop, outputs)]` for the
  runs of prediction windows, `outputs` stacked over the run's windows.
  """
  cfg = params.config
  b, seq = tokens.shape
  if cfg.eviction == "none":
    state = model_lib.init_state(params, b)
    h, _, _ = model_lib.forward_pass(params, model_lib.embed(params, tokens), state, None)
    out = readout(model_lib.logits_from_hidden(params, h), *extras)
    return [(0, 1, jax.tree.map(lambda x: x[None], out))]

  L = cfg.window
  num_windows = seq // L

  def to_windows(x):
    return x.reshape(b, num_windows, L).swapaxes(0, 1)  # [W b L]

  tokens_w, extras_w = to_windows(tokens), tuple(map(to_windows, extras))
  sliding = cfg.eviction == "sliding"

  def consolidate(carry, ctx):
    state, cache = carry
    _, state, final = model_lib.run_passes(params, model_lib.embed(params, ctx), state, cache, n,
                                           grad_passes=grad_passes)
    return (state, model_lib.evict(params, final) if sliding else None), None

  def predict(carry, window):
    state, cache = carry
    ctx, window_extras = window

    def one_pass(h, state):
      h, state, final = model_lib.forward_pass(params, h, state, cache)
      return model_lib.logits_from_hidden(params, h), state, final

    logits, state, final = model_lib.remat(cfg, one_pass)(model_lib.embed(params, ctx), state)
    carry = (state, model_lib.evict(params, final) if sliding else None)
    return carry, readout(logits, *window_extras)

  carry = (model_lib.init_state(params, b), model_lib.init_cache(params, b) if sliding else None)
  results = []
  for is_consolidation, start, stop in _segments(consolidation_windows):
    if is_consolidation:
      carry, _ = jax.lax.scan(consolidate, carry, tokens_w[start:stop])
    else:
      window_extras = tuple(x[start:stop] for x in extras_w)
      carry, out = jax.lax.scan(predict, carry, (tokens_w[start:stop], window_extras))
      results.append((start, stop, out))
  return results


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _loss(params, tokens, targets, mask, n, consolidation_windows, grad_passes):
  b = tokens.shape[0]
  zeros = jnp.zeros((b,), jnp.float32)
  sums = (zeros, zeros, zeros, zeros)
  runs = _process_windows(params, tokens, (targets, mask), n, consolidation_windows, grad_passes,
                          _token_stats)
  for _, _, stats in runs:
    sums = tuple(acc + s.sum(axis=0) for acc, s in zip(sums, stats))
  return _finish(sums)


def score(params: Params, batch: dict, n: int, *,
          consolidation_windows: Optional[Sequence[bool]] = None):
  """Per-token predictions and losses under Algorithm 1's forward (for evaluation).

  Returns `(predictions int32 [b T], token_loss float32 [b T])`: the argmax and the cross-entropy
  of the target at every position of the prediction windows (zeros in consolidation windows).
  The signature of the arrays matches `task.evaluate`'s `score_fn`.
  """
  tokens, targets, mask, layout = _prepare("score", params, batch, n, None,
                                           consolidation_windows)
  return _score(params, tokens, targets, n, layout)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _score(params, tokens, targets, n, consolidation_windows):
  b, seq = tokens.shape

  def readout(logits, tgt):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), nll

  runs = _process_windows(params, tokens, (targets,), n, consolidation_windows, None, readout)
  if params.config.eviction == "none":
    predictions, nll = runs[0][2]
    return predictions[0], nll[0]
  L = params.config.window
  predictions = jnp.zeros((seq // L, b, L), jnp.int32)
  token_loss = jnp.zeros((seq // L, b, L), jnp.float32)
  for start, stop, (pred, nll) in runs:
    predictions = predictions.at[start:stop].set(pred)
    token_loss = token_loss.at[start:stop].set(nll)
  unwindow = lambda x: x.swapaxes(0, 1).reshape(b, seq)
  return unwindow(predictions), unwindow(token_loss)


def _finish(sums):
  nll, correct, count, wrong = sums
  total = jnp.sum(count)
  denom = jnp.maximum(total, 1.0)
  has_labels = count > 0
  exact = jnp.sum((wrong == 0) & has_labels) / jnp.maximum(jnp.sum(has_labels), 1)
  value = jnp.sum(nll) / denom
  metrics = {"loss": value, "accuracy": jnp.sum(correct) / denom, "exact": exact,
             "supervised_tokens": total}
  return value, metrics


def _check_batch(fn, batch, cfg):
  if not isinstance(batch, dict) or not {"tokens", "targets", "loss_mask"} <= set(batch):
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"{fn}: batch must be a dict with tokens, targets and loss_mask; got {got}")
  tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
  model_lib._check_tokens(fn, "batch['tokens']", tokens, cfg)
  if getattr(targets, "shape", None) != tokens.shape or getattr(mask, "shape", None) != tokens.shape:
    raise ValueError(f"{fn}: tokens, targets and loss_mask must share one shape [batch, T]; got "
                     f"{tokens.shape}, {getattr(targets, 'shape', None)}, "
                     f"{getattr(mask, 'shape', None)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"{fn}: batch['targets'] must be integer token ids, got {targets.dtype}")
  if cfg.eviction != "none" and tokens.shape[1] % cfg.window:
    raise ValueError(f"{fn}: sequence length {tokens.shape[1]} is not a multiple of "
                     f"ModelConfig.window={cfg.window}; pad the examples to a multiple of the "
                     "window (tasks do) or change the window")
  return tokens, targets, jnp.asarray(mask).astype(bool)
