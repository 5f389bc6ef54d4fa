"""`ModelConfig.scan_layers`: the blocks of a pass as a `lax.scan` over the repeats of the layout's
unit compute what the unrolled blocks compute (loss, gradients, sleep, wake through the window
cache), and the traced program holds one unit instead of every block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax as sj
from sleep_jax import model as model_lib

WINDOW = 8


def _params(scan: bool, eviction: str, layout: str = "Ag" * 2):
  cfg = sj.ModelConfig(vocab_size=32, d_model=32, num_heads=2, layout=layout, window=WINDOW,
                       eviction=eviction, dtype="float32", scan_layers=scan)
  return sj.init(cfg, jax.random.PRNGKey(0))


def _batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 32, (2, 3 * WINDOW)), jnp.int32)
  mask = jnp.zeros(tokens.shape, bool).at[:, 2 * WINDOW:].set(True)
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": mask}


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(y).max())))


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_loss_and_gradients_equal_the_unrolled_blocks(eviction):
  batch = _batch()
  results = []
  for scan in (False, True):
    params = _params(scan, eviction)
    fn = jax.jit(jax.value_and_grad(
        lambda p: sj.loss(p, batch, 2, consolidation_windows=(True, True, False))[0]))
    results.append(fn(params))
  (loss_unrolled, grads_unrolled), (loss_scanned, grads_scanned) = results
  assert float(loss_unrolled) > 1.0
  np.testing.assert_allclose(loss_scanned, loss_unrolled, rtol=1e-6)
  _close(grads_scanned.weights, grads_unrolled.weights)


def test_sleep_then_wake_through_the_cache_equals_the_unrolled_blocks():
  """Sliding eviction: a slept window, eviction, then a prefill (scanned) and a one-token
  decode step (unrolled in both) behind the retained K/V."""
  tokens = _batch()["tokens"]
  outputs = []
  for scan in (False, True):
    params = _params(scan, "sliding")
    state = sj.init_state(params, 2)
    cache = sj.init_cache(params, 2)
    state, cache = sj.sleep_window(params, state, cache, tokens[:, :WINDOW], 2)
    cache = sj.evict(params, cache)
    logits, state, cache = sj.wake(params, state, cache, tokens[:, WINDOW:WINDOW + 5])
    step, state, cache = sj.wake(params, state, cache, tokens[:, WINDOW + 5:WINDOW + 6])
    outputs.append((logits, step, state, cache.layers, cache.length))
  _close(outputs[1], outputs[0])


def _dot_generals(params):
  jaxpr = jax.make_jaxpr(lambda p, h, s: model_lib.forward_pass(p, h, s, None)[0])(
      params, jnp.ones((1, WINDOW, 32)), sj.init_state(params, 1))
  return str(jaxpr).count("dot_general")


def test_the_traced_pass_holds_one_unit():
  def count(scan):
    cfg = sj.ModelConfig(vocab_size=32, d_model=32, num_heads=2, layout="AG" * 4,
                         window=WINDOW, scan_layers=scan)
    return _dot_generals(jax.eval_shape(lambda: sj.init(cfg, jax.random.PRNGKey(0))))

  unrolled, scanned = count(False), count(True)
  # The loop body is the unit "AG": a quarter of the blocks' products, plus the output head's.
  assert scanned < unrolled / 2


def test_scan_layers_needs_a_repeating_layout():
  assert sj.ModelConfig(vocab_size=8, layout="AGAGAG").layer_unit == 2
  assert sj.ModelConfig(vocab_size=8, layout="AGaAGa").layer_unit == 3
  with pytest.raises(ValueError, match=r"ModelConfig.scan_layers: needs a layout that repeats"):
    sj.ModelConfig(vocab_size=8, layout="AGA", scan_layers=True)
  with pytest.raises(ValueError, match=r"ModelConfig.scan_layers: must be True or False"):
    sj.ModelConfig(vocab_size=8, scan_layers="yes")
