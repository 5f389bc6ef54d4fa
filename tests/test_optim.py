"""Muon's orthogonalisation against an SVD reference, the Muon / AdamW split, the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax as sj
from sleep_jax import optim

SHAPES = [(32, 16), (16, 48), (24, 24)]


def random_matrix(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def polar(g):
  """U V^T from a float64 SVD of g = U S V^T."""
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return u @ vt


@pytest.mark.parametrize("shape", SHAPES)
def test_cubic_newton_schulz_converges_to_the_polar_factor(shape):
  g = random_matrix(shape)
  x = optim.newton_schulz(jnp.asarray(g), steps=30, coeffs="cubic")
  np.testing.assert_allclose(np.asarray(x, np.float64), polar(g), atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_quintic_newton_schulz_keeps_singular_vectors_and_squeezes_singular_values(shape):
  # Muon's tuned coefficients do not converge: they map every singular value into a band
  # around 1 while keeping U and V exactly. So U^T X V is diagonal with entries near 1.
  g = random_matrix(shape, seed=1)
  u, s, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  x = np.asarray(optim.newton_schulz(jnp.asarray(g)), np.float64)
  core = u.T @ x @ vt.T
  diagonal = np.diag(core)
  assert np.abs(core - np.diag(diagonal)).max() < 1e-5
  assert diagonal.min() > 0.6 and diagonal.max() < 1.25
  # The input's conditioning is gone: the update's spread of singular values is far narrower.
  assert diagonal.max() / diagonal.min() < 2 < s.max() / s.min()


def test_muon_update_is_the_orthogonalised_nesterov_momentum():
  fan_in, fan_out, momentum = 8, 32, 0.9
  g1, g2 = random_matrix((fan_in, fan_out), 2), random_matrix((fan_in, fan_out), 3)
  tx = optim.scale_by_muon(momentum, ns_steps=30, ns_coeffs="cubic")
  params = {"w": jnp.zeros((fan_in, fan_out))}
  state = tx.init(params)
  scale = np.sqrt(fan_out / fan_in)  # sqrt(max(1, fan_out / fan_in)) for a wide kernel
  update, state = tx.update({"w": jnp.asarray(g1)}, state, params)
  # m1 = g1; the Nesterov direction g1 + momentum * m1 has the polar factor of g1.
  np.testing.assert_allclose(np.asarray(update["w"]), scale * polar(g1), atol=5e-5)
  update, state = tx.update({"w": jnp.asarray(g2)}, state, params)
  m2 = momentum * g1 + g2
  np.testing.assert_allclose(np.asarray(update["w"]), scale * polar(g2 + momentum * m2), atol=5e-5)
  # A tall kernel (fan_in > fan_out) is not scaled up.
  tall = {"w": jnp.asarray(random_matrix((fan_out, fan_in), 4))}
  update, _ = tx.update(tall, tx.init(tall), tall)
  np.testing.assert_allclose(np.asarray(update["w"]), polar(tall["w"]), atol=5e-5)


def test_muon_rejects_non_matrices():
  with pytest.raises(ValueError, match="matrix"):
    optim.scale_by_muon().init({"scale": jnp.ones(4)})


@pytest.fixture(scope="module")
def weights():
  """A model with every kind of block: attention, fast-weight, fast-weight without MLP."""
  cfg = sj.ModelConfig(vocab_size=11, d_model=16, num_heads=2, layout="AGg", window=4)
  return sj.init(cfg, jax.random.key(0)).weights


def test_labels_send_block_matrices_to_muon_and_the_rest_to_adamw(weights):
  labels = {jax.tree_util.keystr(path, simple=True, separator="/"): label
            for path, label in jax.tree_util.tree_leaves_with_path(optim.param_labels(weights))}
  muon = {path for path, label in labels.items() if label == optim.MUON}
  expected = {f"block_0/attention/{m}/kernel" for m in "qkvo"}
  expected |= {f"block_1/fast_weight/{m}/kernel" for m in ("qkv", "gate", "o")}
  expected |= {f"block_2/fast_weight/{m}/kernel" for m in ("qkv", "gate", "o")}
  expected |= {f"block_{i}/mlp/{m}/kernel" for i in (0, 1) for m in ("gate", "up", "down")}
  assert muon == expected
  adam = set(labels) - muon
  for path in ("embedding/embedding", "head/kernel", "final_norm/scale",
               "block_0/mixer_norm/scale", "block_1/fast_weight/beta/kernel",
               "block_1/fast_weight/alpha/kernel", "block_1/fast_weight/A_log",
               "block_1/fast_weight/dt_bias", "block_1/fast_weight/conv/kernel",
               "block_2/fast_weight/head_norm/scale"):
    assert path in adam


def test_make_optimizer_applies_each_group_its_rule_rate_and_decay(weights):
  grads = jax.tree.map(lambda w: jnp.asarray(random_matrix(w.shape, 5)) if w.ndim == 2
                       else jnp.asarray(np.random.default_rng(6).standard_normal(w.shape),
                                        jnp.float32), weights)
  muon_lr, adam_lr, wd = 0.02, 0.003, 0.1
  tx = optim.make_optimizer(muon_lr=muon_lr, adam_lr=adam_lr, weight_decay=wd, clip_norm=None)
  updates, _ = jax.jit(tx.update)(grads, tx.init(weights), weights)

  # Muon matrix: -lr * (Muon direction + wd * w).
  w = weights["block_0"]["attention"]["q"]["kernel"]
  g = grads["block_0"]["attention"]["q"]["kernel"]
  direction, _ = optim.scale_by_muon().update({"w": g}, optim.scale_by_muon().init({"w": w}))
  np.testing.assert_allclose(updates["block_0"]["attention"]["q"]["kernel"],
                             -muon_lr * (direction["w"] + wd * w), rtol=1e-5, atol=1e-7)
  # AdamW, first step: the bias-corrected moments give g / (|g| + eps) = sign(g).
  emb = weights["embedding"]["embedding"]
  np.testing.assert_allclose(updates["embedding"]["embedding"],
                             -adam_lr * (np.sign(grads["embedding"]["embedding"]) + wd * emb),
                             rtol=1e-4, atol=1e-8)
  # Vectors (norm scales, A_log, dt_bias) are not decayed.
  np.testing.assert_allclose(updates["final_norm"]["scale"],
                             -adam_lr * np.sign(grads["final_norm"]["scale"]), rtol=1e-4)
  np.testing.assert_allclose(updates["block_1"]["fast_weight"]["A_log"],
                             -adam_lr * np.sign(grads["block_1"]["fast_weight"]["A_log"]),
                             rtol=1e-4)


def test_learning_rates_may_be_traced_values():
  # The trainer passes each step's learning rates as arguments of its compiled step.
  weights = {"block_0": {"mlp": {"up": {"kernel": jnp.asarray(random_matrix((4, 8), 7))}}},
             "bias": jnp.ones(3)}
  grads = jax.tree.map(lambda w: jnp.asarray(random_matrix(w.shape, 8)), weights)
  fixed = optim.make_optimizer(muon_lr=0.01, adam_lr=0.001, weight_decay=0.1)
  expected, _ = fixed.update(grads, fixed.init(weights), weights)

  @jax.jit
  def update(lrs):
    tx = optim.make_optimizer(muon_lr=lrs[0], adam_lr=lrs[1], weight_decay=0.1)
    return tx.update(grads, fixed.init(weights), weights)[0]

  got = update(jnp.array([0.01, 0.001], jnp.float32))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  peak, total, warmup, final = 2e-3, 100, 10, 0.1
  schedule = optim.learning_rate_schedule(peak, total, warmup, final)
  steps = np.arange(0, 120)
  values = np.array([schedule(int(s)) for s in steps])
  np.testing.assert_allclose(values[:warmup], peak * (steps[:warmup] + 1) / warmup, rtol=1e-6)
  np.testing.assert_allclose(values[warmup], peak, rtol=1e-6)
  middle = warmup + (total - warmup) // 2
  np.testing.assert_allclose(values[middle], peak * (final + (1 - final) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(values[total:], peak * final, rtol=1e-6)
  assert np.all(np.diff(values[warmup:total + 1]) <= 0)
  # The same numbers in-graph.
  in_graph = jax.jit(jax.vmap(schedule))(jnp.asarray(steps))
  np.testing.assert_allclose(np.asarray(in_graph), values, rtol=1e-5)
