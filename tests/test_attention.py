"""Sliding-window attention by blocks of queries (`sleep_jax.attention`) against a float64 NumPy
reference written from the definition, and the model with blocks against the model with one
masked call."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax as sj
from sleep_jax import attention
from sleep_jax import model as model_lib


def reference(q, k, v, q_start, window):
  """float64: the query at slot p = q_start + i takes a softmax over the keys at slots s with
  p - window < s <= p of q.k / sqrt(d), and averages their values with it."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  out = np.zeros((b, t, h, d))
  for i in range(t):
    p = q_start + i
    slots = np.arange(max(0, p - window + 1), p + 1)
    scores = np.einsum("bhd,bshd->bhs", q[:, i], k[:, slots]) / math.sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out[:, i] = np.einsum("bhs,bshd->bhd", weights, v[:, slots])
  return out


def random_qkv(b, t, c, h, d, seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, d))
  k, v = rng.standard_normal((2, b, c, h, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def assert_close(a, b, tol):
  """Relative error with an absolute floor, leaf by leaf over pytrees."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(y).max())))


def _equations(jaxpr):
  """Every equation of a jaxpr and of its sub-jaxprs (jit-wrapped jnp functions); loops are not
  expected in the paths counted here."""
  for eqn in jaxpr.eqns:
    assert eqn.primitive.name not in ("scan", "while"), "loop bodies would be counted once"
    yield eqn
    subs = [v for value in eqn.params.values()
            for v in (value if isinstance(value, (tuple, list)) else (value,))]
    for sub in subs:
      if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
        yield from _equations(getattr(sub, "jaxpr", sub))


def score_elements(fn, *args, d: int) -> int:
  """Elements of every query-key score matrix in fn's jaxpr: float32 outputs of dot_generals with
  batch dimensions that contract one axis of size d."""
  total = 0
  for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name != "dot_general":
      continue
    (contract, _), (batch, _) = eqn.params["dimension_numbers"]
    lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
    if batch and out.dtype == jnp.float32 and [lhs.shape[i] for i in contract] == [d]:
      total += math.prod(out.shape)
  return total


# ----------------------------------------------------------------------------- the function

L = 8


@jax.jit
def _cache_path(q, k, v, q_start):
  # window and block sizes are static; q_start is traced, as the model's cache length is.
  return attention.sliding_window_attention(q, k, v, window=L, q_start=q_start)


@pytest.mark.parametrize("t,q_start", [
    (L, 0), (L, L - 1), (L, 3),      # a window pass: the first window, after eviction, other
    (1, 0), (1, L - 1), (1, 2 * L - 2),  # decode, up to the last slot
    (5, L - 1),                      # not a multiple of the block (block_size(5, 8) = 2)
])
def test_cache_path_matches_reference_with_traced_start(t, q_start):
  b, c, h, d = 2, 2 * L - 1, 3, 8
  q, k, v = random_qkv(b, t, c, h, d, seed=t + 10 * q_start)
  out = _cache_path(q, k, v, jnp.int32(q_start))
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, reference(q, k, v, q_start, L), 2e-5)


def test_stale_slots_after_the_queries_are_never_seen():
  b, c, h, d = 1, 2 * L - 1, 2, 8
  q, k, v = random_qkv(b, L, c, h, d, seed=3)
  out = _cache_path(q, k, v, jnp.int32(2))
  garbage = k.at[:, 2 + L:].set(1e3), v.at[:, 2 + L:].set(jnp.nan)
  np.testing.assert_array_equal(_cache_path(q, *garbage, jnp.int32(2)), out)


@pytest.mark.parametrize("t,window,block", [
    (37, 6, 2),    # many blocks: lax.map over 18 full blocks, then a short one
    (20, 8, None),  # unrolled: 10 blocks of 2
])
def test_no_cache_path_longer_than_the_window(t, window, block):
  q, k, v = random_qkv(2, t, t, 2, 8, seed=t)
  fn = jax.jit(lambda q, k, v: attention.sliding_window_attention(q, k, v, window=window,
                                                                  block=block))
  assert_close(fn(q, k, v), reference(q, k, v, 0, window), 2e-5)
  # Agrees with JAX's own windowed causal attention as well.
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                          local_window_size=(window - 1, 0))
  assert_close(fn(q, k, v), expected, 2e-5)


@pytest.mark.parametrize("t,c", [(L, 2 * L - 1), (5, 2 * L - 1), (5, L), (1, 2 * L - 1)])
def test_even_padding_for_cudnn_changes_nothing(t, c):
  """cuDNN needs even query and key counts to differentiate a masked call: the padded call (the
  default for implementation="cudnn", run here through XLA) equals the reference, gradients too."""
  q, k, v = random_qkv(2, t, c, 3, 8, seed=11)
  start = c - t
  mask = attention.sliding_window_mask(start + jnp.arange(t), jnp.arange(c), L)

  cotangent = jnp.asarray(np.random.default_rng(12).standard_normal((2, t, 3, 8)), jnp.float32)

  @jax.jit
  def value_and_grads(q, k, v):
    def call(even):
      return lambda *a: jnp.sum(cotangent * attention.masked_attention(
          *a, mask, implementation="xla", even_lengths=even))
    padded = attention.masked_attention(q, k, v, mask, implementation="xla", even_lengths=True)
    return padded, [jax.grad(call(even), argnums=(0, 1, 2))(q, k, v) for even in (True, False)]

  padded, grads = value_and_grads(q, k, v)
  assert_close(padded, reference(q, k, v, start, L), 1e-5)
  assert_close(grads[0], grads[1], 1e-5)


def test_bfloat16_inputs_softmax_in_float32():
  q, k, v = random_qkv(1, L, 2 * L - 1, 2, 16, seed=5, dtype=jnp.bfloat16)
  out = _cache_path(q, k, v, jnp.int32(L - 1))
  assert out.dtype == jnp.bfloat16
  assert_close(out, reference(q, k, v, L - 1, L), 3e-2)


def test_blocks_score_fewer_pairs_than_one_masked_call():
  c, t = 2 * L - 1, L
  q, k, v = random_qkv(1, t, c, 1, 4, seed=0)
  blocked = score_elements(_cache_path, q, k, v, jnp.int32(0), d=4)
  n = attention.block_size(t, L)
  assert blocked == t * (n + L - 1) < t * c
  decode = score_elements(_cache_path, q[:, :1], k, v, jnp.int32(0), d=4)
  assert decode == L


def test_block_size_choice():
  assert attention.block_size(1, 1024) == 1          # decode: one block
  assert attention.block_size(100, 1024) == 100      # fewer queries than L / 4: one block
  assert attention.block_size(1024, 1024) == 256     # t = L: four blocks of L / 4
  n = attention.block_size(1000, 1024)               # a divisor near L / 4 when there is one
  assert 1000 % n == 0 and 128 <= n <= 512
  assert attention.block_size(1021, 1024) == 256     # 1021 is prime: a short last block
  assert not attention.blocks_pay(attention.MIN_BLOCKED_WINDOW - 1)
  assert attention.blocks_pay(attention.MIN_BLOCKED_WINDOW)


def test_where_the_model_attends_by_blocks():
  """XLA: blocks with and without a cache. cuDNN: blocks behind a cache only (without one its
  `local_window_size` skips the masked tiles itself). Short windows: one call everywhere."""
  from sleep_jax import layers  # pylint: disable=g-import-not-at-top
  window = attention.MIN_BLOCKED_WINDOW
  for impl in (None, "xla"):
    cfg = sj.ModelConfig(vocab_size=16, window=window, eviction="sliding", attention_impl=impl)
    assert layers._blocked(cfg, with_cache=True) and layers._blocked(cfg, with_cache=False)
    assert not layers._blocked(cfg.replace(window=window - 1), with_cache=True)
  cudnn = sj.ModelConfig(vocab_size=16, window=window, eviction="sliding",
                         attention_impl="cudnn")
  assert layers._blocked(cudnn, with_cache=True)
  assert not layers._blocked(cudnn, with_cache=False)
  assert not layers._blocked(cudnn.replace(window=window - 1), with_cache=True)
  # Splash behind a cache: the XLA blocks (its kernel needs a static mask).
  splash = cudnn.replace(attention_impl="splash")
  assert layers._blocked(splash, with_cache=True) and layers._dense_impl(splash) is None


def test_bad_arguments_name_the_parameter():
  q, k, v = random_qkv(1, 4, 7, 2, 8, seed=0)
  with pytest.raises(ValueError, match="window"):
    attention.sliding_window_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="block"):
    attention.sliding_window_attention(q, k, v, window=4, block=0)
  with pytest.raises(ValueError, match=r"k, v \[b c h d\]"):
    attention.sliding_window_attention(q, k, v[:, :3], window=4)
  with pytest.raises(ValueError, match="agree"):
    attention.sliding_window_attention(q, k[..., :4], v[..., :4], window=4)


# ----------------------------------------------------------------------------- the model

WINDOW = attention.MIN_BLOCKED_WINDOW  # the smallest window the model runs by blocks


def _model_outputs(params, batch, n):
  """The sliding objective over two windows (n sleep passes on the first), the gradient of two
  window passes through the cache (cache lengths 0 and L - 1: t = L queries against 2L - 1
  slots), and a pass without a cache over all 2L tokens."""
  tokens = batch["tokens"]
  objective = jax.jit(lambda p: sj.loss(p, batch, n, consolidation_windows=(True, False))[0])

  def two_windows(p):
    state, cache = sj.init_state(p, 2), sj.init_cache(p, 2)
    h, state, cache = model_lib.forward_pass(p, model_lib.embed(p, tokens[:, :WINDOW]), state,
                                             cache)
    first = model_lib.logits_from_hidden(p, h)
    h, _, _ = model_lib.forward_pass(p, model_lib.embed(p, tokens[:, WINDOW:]), state,
                                     model_lib.evict(p, cache))
    return jnp.sum(first * jnp.sin(first)) + jnp.sum(model_lib.logits_from_hidden(p, h) ** 2)

  no_cache = jax.jit(lambda p: model_lib.forward_pass(p, model_lib.embed(p, tokens),
                                                      sj.init_state(p, 2), None)[0])
  return (objective(params), jax.jit(jax.value_and_grad(two_windows))(params),
          no_cache(params))


def test_model_by_blocks_equals_one_masked_call():
  cfg = sj.ModelConfig(vocab_size=11, d_model=32, num_heads=2, layout="Aa", window=WINDOW,
                       eviction="sliding", dtype="float32")
  params = sj.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 2 * WINDOW), 0, 11, dtype=jnp.int32)
  mask = jnp.zeros((2, 2 * WINDOW), bool).at[:, WINDOW:].set(True)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": mask}
  blocked = _model_outputs(params, batch, 2)
  jax.clear_caches()
  with attention.force_dense_masks():
    dense = _model_outputs(params, batch, 2)
  jax.clear_caches()
  assert_close(blocked, dense, 2e-5)


def test_model_window_pass_scores_blocks_only_from_this_window_size():
  """The model really takes the blocked path at WINDOW (and one masked call below it): count the
  scores one window pass behind a full cache prefix computes, attention-only model."""

  def scores(window, dense=False):
    cfg = sj.ModelConfig(vocab_size=11, d_model=16, num_heads=2, layout="a", window=window,
                         eviction="sliding")
    params = jax.eval_shape(lambda: sj.init(cfg, jax.random.key(0)))
    cache = sj.init_cache(params, 1).replace(length=jnp.int32(window - 1))
    fn = lambda p, x, s, c: model_lib.forward_pass(p, x, s, c)[0]
    args = (params, jnp.ones((1, window, 16)), sj.init_state(params, 1), cache)
    if not dense:
      return score_elements(fn, *args, d=8)
    with attention.force_dense_masks():
      return score_elements(fn, *args, d=8)

  heads = 2
  n = attention.block_size(WINDOW, WINDOW)
  assert scores(WINDOW) == heads * WINDOW * (n + WINDOW - 1)
  assert scores(WINDOW, dense=True) == heads * WINDOW * (2 * WINDOW - 1)
  assert scores(WINDOW - 1) == heads * (WINDOW - 1) * (2 * WINDOW - 3)
  # The benchmarks' count of computed pairs (FLOPs the hardware does) follows the same path.
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  for window in (WINDOW, WINDOW - 1):
    cfg = sj.ModelConfig(vocab_size=11, d_model=16, num_heads=2, layout="a", window=window,
                         eviction="sliding")
    assert heads * common.window_pairs(cfg, 1, computed=True) == scores(window)


# ----------------------------------------------------------------------------- the benchmark


def test_benchmark_tables_of_blocks_and_model(tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from benchmarks import attention as bench
  bench.main(["--quick", "--seq_lens=8", "--masks=causal", "--modes=fwd", "--block_windows=8",
              "--model_windows=8", "--model_d=16", "--model_layout=A", "--heads=2",
              "--head_dim=8", "--runs=2", "--warmup=1", f"--out_dir={tmp_path}"])
  with open(tmp_path / "attention_blocks_cpu.json", encoding="utf-8") as f:
    blocks = json.load(f)
  paths = {(r["mask"], r["mode"]): r for r in blocks["rows"]}
  assert set(paths) == {("pass_mask", "fwd"), ("pass_blocks", "fwd"), ("decode_mask", "fwd"),
                        ("decode_blocks", "fwd"), ("long_local", "fwd"), ("long_blocks", "fwd")}
  n = attention.block_size(8, 8)
  assert paths[("pass_blocks", "fwd")]["scores"] == 8 * (n + 7)
  assert paths[("pass_mask", "fwd")]["scores"] == 8 * 15
  assert all(r["median_ms"] > 0 for r in blocks["rows"])
  for s in blocks["summary"]["speedups"]:
    shape = s["what"].split()[2].rstrip(":")
    base = "local" if shape == "long" else "mask"
    assert s["speedup"] == pytest.approx(paths[(f"{shape}_{base}", "fwd")]["median_ms"]
                                         / paths[(f"{shape}_blocks", "fwd")]["median_ms"])
  with open(tmp_path / "attention_model_cpu.json", encoding="utf-8") as f:
    model = json.load(f)
  assert {(r["mask"], r["mode"]) for r in model["rows"]} == {
      (p, w) for p in ("blocks", "mask") for w in ("window_pass", "loss_grad")}
  assert len(model["summary"]["speedups"]) == 2


# ----------------------------------------------------------------------------- splash (TPU kernel)
# On the CPU the splash kernel runs in the Pallas interpreter: the same kernel code (tiles, mask
# tables, online softmax, hand-written backward) as the Mosaic lowering on a TPU.


@pytest.mark.parametrize("t,window", [(100, None), (256, None), (300, 64), (200, 300)])
def test_splash_matches_the_definition(t, window):
  """Causal (window None: every earlier slot) and sliding windows; lengths that are and are not
  multiples of the 128-token tile (padded), a window longer than the sequence."""
  q, k, v = random_qkv(2, t, t, 2, 16, seed=t)
  out = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, window=window))(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, reference(q, k, v, 0, window or t), 2e-5)


def test_splash_gradients_match_dense_attention():
  """The kernel's own backward against autodiff through `jax.nn.dot_product_attention` with the
  same window (XLA), for a loss that weighs every output differently."""
  q, k, v = random_qkv(1, 200, 200, 2, 16, seed=3)
  weights = jax.random.normal(jax.random.key(0), q.shape)

  def loss(attend):
    return lambda q, k, v: jnp.sum(weights * attend(q, k, v))

  splash = loss(lambda q, k, v: attention.splash_attention(q, k, v, window=50))
  dense = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            local_window_size=(49, 0)))
  got = jax.jit(jax.grad(splash, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(q, k, v)
  assert_close(got, want, 1e-4)


def test_splash_bfloat16_returns_bfloat16_close_to_float32():
  q, k, v = random_qkv(1, 128, 128, 2, 32, seed=4)
  low = attention.splash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert low.dtype == jnp.bfloat16
  assert_close(low.astype(jnp.float32), reference(q, k, v, 0, 128), 3e-2)


def test_splash_rejects_mismatched_shapes_and_bad_windows():
  q, k, v = random_qkv(1, 8, 8, 2, 8, seed=0)
  with pytest.raises(ValueError, match="one shape"):
    attention.splash_attention(q, k[:, :4], v)
  with pytest.raises(ValueError, match="window"):
    attention.splash_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="attention_impl"):
    sj.ModelConfig(vocab_size=8, attention_impl="flash")


@pytest.mark.parametrize("eviction", ["hard", "none"])
def test_model_with_splash_equals_xla(eviction):
  """Loss and gradients of the objective (hard eviction: window passes without a cache, the
  splash path; eviction none: one causal pass over the sequence), and a streamed wake prefill
  (behind a cache: XLA under both settings) against `attention_impl="xla"`."""
  cfg = sj.ModelConfig(vocab_size=11, d_model=32, num_heads=2, layout="AG", window=16,
                       eviction=eviction, dtype="float32", delta_impl="scan")
  params = sj.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 11, dtype=jnp.int32)
  mask = jnp.zeros((2, 48), bool).at[:, 32:].set(True)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": mask}
  layout = (True, True, False) if eviction == "hard" else None
  n = 2 if eviction == "hard" else 1

  def outputs(p):
    grad = jax.jit(jax.value_and_grad(
        lambda p: sj.loss(p, batch, n, consolidation_windows=layout)[0]))
    if eviction == "none":
      return grad(p)
    state = sj.sleep(p, sj.init_state(p, 2), tokens[:, :16], 2)
    logits, _, _ = sj.wake(p, state, sj.init_cache(p, 2), tokens[:, 16:24])
    return grad(p), state, logits

  splash = params.replace(config=cfg.replace(attention_impl="splash"))
  got = outputs(splash)
  want = outputs(params.replace(config=cfg.replace(attention_impl="xla")))
  assert_close(got, want, 2e-5)
  # The kernel really ran: the objective's program holds Pallas calls (and XLA's does not).
  objective = jax.make_jaxpr(lambda p: sj.loss(p, batch, n, consolidation_windows=layout)[0])
  assert "pallas_call" in str(objective(splash))
  assert "pallas_call" not in str(objective(params))
