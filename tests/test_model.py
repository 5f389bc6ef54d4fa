"""Semantics of the public API: sleep, wake, loss, streaming, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax as sj
from sleep_jax import model as model_lib
from sleep_jax import streaming
from sleep_jax.layers import rope
from sleep_jax.streaming import Stream

VOCAB, L, B = 13, 8, 2


def make(layout="AG", eviction="hard", rule="gated_delta", seed=0, **kw):
  cfg = sj.ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, layout=layout, window=L,
                       eviction=eviction, rule=rule, **kw)
  return sj.init(cfg, jax.random.key(seed))


def tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, dtype=jnp.int32)


def max_diff(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(la, lb))


def assert_close(a, b, tol=2e-5):
  """Relative error with an absolute floor, over whole pytrees."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(y).max())))


# ----------------------------------------------------------------------------- wake / sleep


@pytest.mark.parametrize("layout,eviction,rule", [
    ("AGAG", "hard", "gated_delta"),
    ("gA", "sliding", "gated_delta"),
    ("G", "hard", "hebbian"),
])
def test_window_one_call_equals_token_by_token_equals_sleep_n1(layout, eviction, rule):
  params = make(layout, eviction, rule)
  ctx = tokens((B, L))
  state0 = sj.init_state(params, B)
  logits, state_one, cache_one = sj.wake(params, state0, sj.init_cache(params, B), ctx)

  state, cache, per_token = state0, sj.init_cache(params, B), []
  for i in range(L):
    step_logits, state, cache = sj.wake(params, state, cache, ctx[:, i:i + 1])
    per_token.append(step_logits)
  assert_close(jnp.concatenate(per_token, axis=1), logits)
  assert_close(state, state_one)
  assert int(cache.length) == int(cache_one.length) == L
  assert_close(sj.sleep(params, state0, ctx, 1), state_one)
  # The state is not trivially zero: the window was written into it.
  assert max_diff(state_one, state0) > 1e-3


def test_sleep_n_passes_equals_python_loop_and_n0_is_identity():
  params = make()
  ctx = tokens((B, L))
  state0 = jax.tree.map(lambda s: None if s is None else 0.1 * jnp.ones_like(s),
                        sj.init_state(params, B), is_leaf=lambda x: x is None)
  assert sj.sleep(params, state0, ctx, 0) is state0
  h, state = model_lib.embed(params, ctx), state0
  for n in range(1, 5):
    h, state, _ = model_lib.forward_pass(params, h, state, None)
    assert_close(sj.sleep(params, state0, ctx, n), state)
  assert max_diff(sj.sleep(params, state0, ctx, 4), sj.sleep(params, state0, ctx, 1)) > 1e-3


def test_sleep_is_jittable_and_differentiable_in_the_state():
  params = make()
  ctx = tokens((B, L))
  state0 = sj.init_state(params, B)
  jitted = jax.jit(sj.sleep, static_argnums=3)
  assert_close(jitted(params, state0, ctx, 3), sj.sleep(params, state0, ctx, 3))
  grads = jax.grad(lambda s: jnp.sum(sj.sleep(params, s, ctx, 2)[1] ** 2))(state0)
  assert float(jnp.sum(jnp.abs(grads[1]))) > 0 and bool(jnp.all(jnp.isfinite(grads[1])))


def test_bfloat16_compute_keeps_float32_state():
  params = make(dtype="bfloat16")
  state = sj.sleep(params, sj.init_state(params, B), tokens((B, L)), 2)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))
  reference = sj.sleep(make(dtype="float32"), sj.init_state(params, B), tokens((B, L)), 2)
  assert_close(state, reference, tol=5e-2)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_inference_params_cast_once_and_change_no_bit(eviction):
  """With bfloat16 compute, inference_params stores in bf16 exactly the weights the model casts
  before use; wake, sleep and sleep_window then give bit-identical results."""
  params = make("AG", eviction, dtype="bfloat16")
  cast = sj.inference_params(params)
  dtypes = {jax.tree_util.keystr(path): w.dtype
            for path, w in jax.tree_util.tree_flatten_with_path(cast.weights)[0]}
  for name, dtype in [
      ("['block_0']['attention']['q']['kernel']", jnp.bfloat16),
      ("['block_1']['fast_weight']['qkv']['kernel']", jnp.bfloat16),
      ("['block_1']['fast_weight']['conv']['kernel']", jnp.bfloat16),
      ("['block_1']['mlp']['down']['kernel']", jnp.bfloat16),
      ("['embedding']['embedding']", jnp.bfloat16),
      ("['head']['kernel']", jnp.bfloat16),
      ("['block_1']['fast_weight']['beta']['kernel']", jnp.float32),
      ("['block_1']['fast_weight']['alpha']['kernel']", jnp.float32),
      ("['block_1']['fast_weight']['A_log']", jnp.float32),
      ("['block_1']['fast_weight']['dt_bias']", jnp.float32),
      ("['block_0']['mixer_norm']['scale']", jnp.float32)]:
    assert dtypes[name] == dtype, name
  state, cache = sj.init_state(params, B), sj.init_cache(params, B)
  ctx, more = tokens((B, L), seed=4), tokens((B, 1), seed=5)

  def run(p):
    slept = sj.sleep(p, state, ctx, 2)
    _, woken, grown = sj.wake(p, state, cache, ctx[:, :L - 1])
    step = sj.wake(p, woken, grown, more)
    return slept, step, sj.sleep_window(p, state, cache, ctx, 2)

  for got, want in zip(jax.tree.leaves(run(cast)), jax.tree.leaves(run(params))):
    np.testing.assert_array_equal(got, want)
  f32 = make("AG", eviction, dtype="float32")
  assert sj.inference_params(f32) is f32


def test_bfloat16_stream_computes_with_cast_weights_and_the_same_bits():
  """Stream computes with inference_params: with bf16 compute its logits and state are
  bit-identical to a stream that casts the float32 weights inside every step, and follow the
  plain definition (the public functions window by window) up to bf16 rounding."""
  params = make("AG", "hard", dtype="bfloat16")
  stream_tokens = tokens((B, 2 * L + 3), seed=6)
  cast, uncast = Stream(params, B, 2), Stream(params, B, 2)
  # pylint: disable=protected-access
  uncast._weights = params
  assert jax.tree.leaves(cast._weights.weights)[0].dtype == jnp.bfloat16
  # pylint: enable=protected-access
  got = []
  for stream in (cast, uncast):
    # Uneven chunks that cross boundaries, then single tokens.
    pieces = [stream_tokens[:, :5], stream_tokens[:, 5:L + 7]]
    pieces += [stream_tokens[:, i:i + 1] for i in range(L + 7, stream_tokens.shape[1])]
    got.append(jnp.concatenate([stream.feed(piece) for piece in pieces], axis=1))
  np.testing.assert_array_equal(got[0], got[1])
  for x, y in zip(jax.tree.leaves(cast.state), jax.tree.leaves(uncast.state)):
    np.testing.assert_array_equal(x, y)
  ref_logits, ref_state = _reference_stream(params, stream_tokens, 2)
  assert_close(got[0], ref_logits, tol=3e-2)
  assert_close(cast.state, ref_state, tol=3e-2)


# ----------------------------------------------------------------------------- streaming


def _reference_stream(params, stream_tokens, n):
  """The plain definition, composed from the public functions window by window."""
  state, cache = sj.init_state(params, B), sj.init_cache(params, B)
  logits = []
  for start in range(0, stream_tokens.shape[1], L):
    window = stream_tokens[:, start:start + L]
    window_logits, woken, _ = sj.wake(params, state, cache, window)
    logits.append(window_logits)
    if window.shape[1] == L:
      state, cache = sj.sleep_window(params, state, cache, window, n)
    else:
      state = woken
  return jnp.concatenate(logits, axis=1), state


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_stream_shortcut_equals_plain_definition(eviction):
  params = make("AG", eviction)
  stream_tokens = tokens((B, 3 * L + 3), seed=3)
  ref_logits, ref_state = _reference_stream(params, stream_tokens, 3)
  for shortcut in (True, False):
    stream = Stream(params, B, 3, shortcut=shortcut)
    # Uneven chunks that cross boundaries, then single tokens.
    got = [stream.feed(stream_tokens[:, :5]), stream.feed(stream_tokens[:, 5:L + 7])]
    got += [stream.feed(stream_tokens[:, i:i + 1]) for i in range(L + 7, stream_tokens.shape[1])]
    assert_close(jnp.concatenate(got, axis=1), ref_logits, tol=1e-4)
    assert_close(stream.state, ref_state, tol=1e-4)
    assert stream.windows_slept == 3 and stream.tokens_seen == stream_tokens.shape[1]


def test_sliding_eviction_attends_to_the_previous_window_hard_does_not():
  """Under sliding eviction an attention-only model sees the retained L - 1 tokens."""
  for eviction, sees_previous in (("hard", False), ("sliding", True)):
    params = make("AA", eviction)
    first, second = tokens((B, L), seed=4), tokens((B, L), seed=5)
    other_first = first.at[:, -1].set((first[:, -1] + 1) % VOCAB)
    outs = []
    for w0 in (first, other_first):
      stream = Stream(params, B, 1)
      stream.feed(w0)
      outs.append(stream.feed(second))
    assert (max_diff(outs[0], outs[1]) > 1e-4) == sees_previous


def test_stream_generate_greedy_matches_argmax_of_feed():
  params = make()
  prompt = tokens((B, 5), seed=6)
  generated = Stream(params, B, 2).generate(prompt, 2 * L)
  stream = Stream(params, B, 2)
  logits = stream.feed(prompt)[:, -1]
  for i in range(2 * L):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    np.testing.assert_array_equal(np.asarray(token), generated[:, i])
    logits = stream.feed(token[:, None])[:, -1]
  sampled = Stream(params, B, 2).generate(prompt, 4, temperature=1.0, rng=jax.random.key(0),
                                          top_k=3)
  assert sampled.shape == (B, 4) and sampled.min() >= 0 and sampled.max() < VOCAB


# ----------------------------------------------------------------------------- rotated keys


def _rope_reference(x, positions, base):
  """RoPE from its definition, float64: the pair (x_i, x_{i+d/2}) as the complex number
  x_i + 1j x_{i+d/2}, multiplied by exp(1j * position * base^(-i/(d/2))). x: [.. t h d];
  positions: [t] or [b t]."""
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  theta = np.asarray(positions, np.float64)[..., None, None] * base ** (-np.arange(half) / half)
  z = z * np.exp(1j * theta)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_counter_rotation_by_minus_start_equals_rotation_to_the_new_slot():
  base = 10_000.0
  x = jax.random.normal(jax.random.key(0), (B, 6, 2, 16), jnp.float32)
  for positions in (jnp.arange(6), jnp.arange(6) + 37,
                    jnp.array([[0, 5, 9, 100, 250, 301], [3, 4, 60, 61, 62, 200]])):
    rotated = rope(x, positions, base)
    np.testing.assert_allclose(rotated, _rope_reference(x, positions, base), rtol=0, atol=1e-4)
    for start in (0, 1, 7, 37, 250):
      turned = rope(rotated, -start, base)  # a scalar position: every token turned alike
      np.testing.assert_allclose(turned, rope(x, positions - start, base), rtol=0, atol=1e-4)
      np.testing.assert_allclose(turned, _rope_reference(x, positions - start, base),
                                 rtol=0, atol=1e-4)
  # The check can fail: turning the wrong way is far off.
  wrong = rope(rope(x, jnp.arange(6) + 37, base), 7, base)
  assert max_diff(wrong, rope(x, jnp.arange(6) + 30, base)) > 0.1


def test_sliding_evict_moves_keys_counter_rotated_and_values_as_they_are():
  """Keys are cached rotated by their slot: after eviction slot s - start must hold
  rope(k, s - start), values and conv tails moved or kept unchanged."""
  params = make("Ag", "sliding")
  empty = sj.init_cache(params, B)
  for length in (L, L + 3, 2 * L - 1):  # start = 1 (first window), 4, L (a full window)
    keys = iter(jax.random.split(jax.random.key(length), 3))
    raw = {name: jax.random.normal(next(keys), buf.shape, buf.dtype)
           for name, buf in empty.layers[0].items()}
    conv = jax.random.normal(next(keys), empty.layers[1]["conv"].shape)
    cache = empty.replace(
        layers=({"k": rope(raw["k"], jnp.arange(empty.capacity), params.config.rope_base),
                 "v": raw["v"]}, {"conv": conv}),
        length=jnp.asarray(length, jnp.int32))
    out = sj.evict(params, cache)
    keep, start = L - 1, length - (L - 1)
    assert int(out.length) == keep
    expected_k = _rope_reference(raw["k"][:, start:start + keep], np.arange(keep),
                                 params.config.rope_base)
    np.testing.assert_allclose(out.layers[0]["k"][:, :keep], expected_k, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out.layers[0]["v"][:, :keep], raw["v"][:, start:start + keep])
    np.testing.assert_array_equal(out.layers[1]["conv"], conv)


def _attention_model_reference(params, toks, window):
  """An attention-only model (blocks 'A' / 'a') from its equations, float64: every token attends
  to itself and the `window` - 1 tokens before it (all earlier tokens with window=None)."""
  cfg = params.config
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), params.weights)
  heads, d = cfg.num_heads, cfg.resolved_head_dim

  def norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

  x = w["embedding"]["embedding"][np.asarray(toks)]  # [b T m]
  b, T, _ = x.shape
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = (j <= i) & ((j > i - window) if window else True)
  for layer, (kind, has_mlp) in enumerate(cfg.block_kinds):
    assert kind == "attention"
    blk = w[f"block_{layer}"]
    y = norm(x, blk["mixer_norm"]["scale"])
    q, k, v = ((y @ blk["attention"][n]["kernel"]).reshape(b, T, heads, d) for n in "qkv")
    q, k = (_rope_reference(z, np.arange(T), cfg.rope_base) for z in (q, k))
    scores = np.where(visible, np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d), -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    x = x + np.einsum("bhij,bjhd->bihd", p, v).reshape(b, T, heads * d) @ blk["attention"]["o"]["kernel"]
    if has_mlp:
      y = norm(x, blk["mlp_norm"]["scale"])
      gate, up = y @ blk["mlp"]["gate"]["kernel"], y @ blk["mlp"]["up"]["kernel"]
      x = x + (gate / (1 + np.exp(-gate)) * up) @ blk["mlp"]["down"]["kernel"]
  return norm(x, w["final_norm"]["scale"]) @ w["head"]["kernel"]


def _wake_with_sliding_evictions(params, toks, pieces):
  """`wake` over toks [b T] in pieces of the sizes `pieces` (cycled, cut at window ends), with
  `evict` at every window end: the cache path across eviction boundaries."""
  state, cache = sj.init_state(params, B), sj.init_cache(params, B)
  logits, sizes = [], iter(np.resize(pieces, toks.shape[1]))
  for start in range(0, toks.shape[1], L):
    window = toks[:, start:start + L]
    pos = 0
    while pos < window.shape[1]:
      size = min(int(next(sizes)), window.shape[1] - pos)
      step_logits, state, cache = sj.wake(params, state, cache, window[:, pos:pos + size])
      logits.append(step_logits)
      pos += size
    if window.shape[1] == L:
      cache = sj.evict(params, cache)
  return jnp.concatenate(logits, axis=1)


def _full_forward_logits(params, toks):
  state = sj.init_state(params, B)
  h, _, _ = model_lib.forward_pass(params, model_lib.embed(params, toks), state, None)
  return model_lib.logits_from_hidden(params, h)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_sliding_attention_through_evictions_matches_reference_from_equations(dtype, tol):
  """Across three sliding eviction boundaries (keys cached rotated, counter-rotated when moved),
  token by token and in chunks, wake equals softmax attention over the last L tokens."""
  params = make("Aa", "sliding", dtype=dtype)
  toks = tokens((B, 3 * L + 3), seed=11)
  reference = _attention_model_reference(params, toks, window=L)
  # The window matters on this sequence: full causal attention gives other logits.
  assert np.abs(_attention_model_reference(params, toks, window=None) - reference).max() > 1e-2
  assert_close(_full_forward_logits(params, toks), reference, tol=tol)
  for pieces in ((1,), (3, 5)):
    assert_close(_wake_with_sliding_evictions(params, toks, pieces), reference, tol=tol)


def test_sliding_hybrid_wake_through_evictions_equals_full_forward():
  """The hybrid (fast-weight state and conv tails carried across boundaries) fed through the
  window cache with sliding evictions equals one forward pass over the whole sequence."""
  params = make("AG", "sliding")
  toks = tokens((B, 3 * L + 3), seed=12)
  full = _full_forward_logits(params, toks)
  for pieces in ((1,), (3, 5)):
    assert_close(_wake_with_sliding_evictions(params, toks, pieces), full, tol=1e-4)


# ----------------------------------------------------------------------------- loss


def _batch(num_windows, supervised_windows, seed=7):
  T = num_windows * L
  toks = tokens((B, T), seed=seed)
  targets = tokens((B, T), seed=seed + 1)
  mask = np.zeros((B, T), bool)
  for w in supervised_windows:
    mask[:, w * L + 2:w * L + 5] = True
  mask[1, (supervised_windows[-1] * L + 4)] = False  # uneven supervision per example
  return {"tokens": toks, "targets": targets, "loss_mask": jnp.asarray(mask)}


def _hand_rolled_loss(params, batch, n):
  state, cache = sj.init_state(params, B), sj.init_cache(params, B)
  nll, correct, count = 0.0, 0.0, 0.0
  wrong = np.zeros(B)
  for w in range(batch["tokens"].shape[1] // L):
    sl = slice(w * L, (w + 1) * L)
    ctx, tgt, msk = batch["tokens"][:, sl], batch["targets"][:, sl], np.asarray(batch["loss_mask"][:, sl])
    if not msk.any():
      state, cache = sj.sleep_window(params, state, cache, ctx, n)
      continue
    logits, state, grown = sj.wake(params, state, cache, ctx)
    cache = sj.evict(params, grown)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    tgt = np.asarray(tgt)
    picked = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    nll += float(-(picked * msk).sum())
    hit = (logp.argmax(-1) == tgt) & msk
    correct += hit.sum()
    count += msk.sum()
    wrong += (msk & ~hit).sum(-1)
  return nll / count, correct / count, float(np.mean(wrong == 0))


@pytest.mark.parametrize("eviction,n", [("hard", 1), ("hard", 3), ("sliding", 2)])
def test_loss_equals_hand_rolled_windows(eviction, n):
  params = make("AG", eviction)
  batch = _batch(4, [2, 3])
  value, metrics = sj.loss(params, batch, n)
  ref_loss, ref_acc, ref_exact = _hand_rolled_loss(params, batch, n)
  np.testing.assert_allclose(float(value), ref_loss, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["accuracy"]), ref_acc, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["exact"]), ref_exact, rtol=1e-6)
  assert int(metrics["supervised_tokens"]) == int(np.asarray(batch["loss_mask"]).sum())
  # score: the same forward, per token.
  predictions, token_loss = sj.score(params, batch, n)
  mask = np.asarray(batch["loss_mask"])
  np.testing.assert_allclose(float(np.asarray(token_loss)[mask].mean()), ref_loss, rtol=1e-4)
  hits = (np.asarray(predictions) == np.asarray(batch["targets"])) & mask
  np.testing.assert_allclose(hits.sum() / mask.sum(), ref_acc, rtol=1e-6)
  assert not np.asarray(token_loss)[:, :2 * L].any()  # consolidation windows carry no loss


def test_loss_under_jit_needs_static_layout_and_gives_finite_gradients():
  params = make()
  batch = _batch(3, [2])
  layout = (True, True, False)
  step = jax.jit(jax.value_and_grad(
      lambda p, b: sj.loss(p, b, 2, consolidation_windows=layout)[0]))
  value, grads = step(params, batch)
  np.testing.assert_allclose(float(value), float(sj.loss(params, batch, 2)[0]), rtol=1e-5)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="consolidation_windows"):
    jax.jit(lambda p, b: sj.loss(p, b, 2)[0])(params, batch)


def test_truncated_bptt_changes_gradients_only_when_truncating():
  params = make()
  batch = _batch(3, [2])

  def grads(k):
    return jax.grad(lambda p: sj.loss(p, batch, 3, grad_passes=k)[0])(params)

  full, truncated = grads(None), grads(1)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(truncated))
  assert max_diff(truncated, full) > 1e-6
  # Same forward value either way.
  np.testing.assert_allclose(float(sj.loss(params, batch, 3, grad_passes=1)[0]),
                             float(sj.loss(params, batch, 3)[0]), rtol=1e-6)


def test_hard_eviction_prediction_depends_on_the_past_only_through_the_state():
  batch = _batch(3, [2])
  changed = dict(batch, tokens=batch["tokens"].at[:, 3].set((batch["tokens"][:, 3] + 1) % VOCAB))
  # A hybrid: the changed consolidated token changes the state, hence the loss.
  hybrid = make("AG")
  s1 = sj.sleep(hybrid, sj.init_state(hybrid, B), batch["tokens"][:, :L], 2)
  s2 = sj.sleep(hybrid, sj.init_state(hybrid, B), changed["tokens"][:, :L], 2)
  assert max_diff(s1, s2) > 1e-4
  assert abs(float(sj.loss(hybrid, batch, 2)[0]) - float(sj.loss(hybrid, changed, 2)[0])) > 1e-6
  # Same state, same window: identical logits, whatever came before.
  pred = batch["tokens"][:, 2 * L:]
  a = sj.wake(hybrid, s1, sj.init_cache(hybrid, B), pred)[0]
  b = sj.wake(hybrid, jax.tree.map(jnp.copy, s1), sj.init_cache(hybrid, B), pred)[0]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Attention only under hard eviction has no state: earlier windows cannot matter at all.
  transformer = make("AA")
  assert float(sj.loss(transformer, batch, 2)[0]) == float(sj.loss(transformer, changed, 2)[0])


def test_no_eviction_is_plain_causal_model():
  params = make("AG", "none")
  batch = _batch(2, [1])
  value, _ = sj.loss(params, batch, 1)
  cache = sj.init_cache(params, B, capacity=2 * L)
  logits, _, _ = sj.wake(params, sj.init_state(params, B), cache, batch["tokens"])
  logp = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  np.testing.assert_allclose(float(value), float(-(picked * mask).sum() / mask.sum()), rtol=1e-5)
  with pytest.raises(ValueError, match="eviction"):
    sj.sleep(params, sj.init_state(params, B), batch["tokens"][:, :L], 2)


def test_chunk_size_none_runs_the_backends_chunk_in_the_model():
  """ModelConfig(chunk_size=None) resolves to sleep_jax.ops.default_chunk_size() at trace time:
  its logits are bit-identical to the model configured with that chunk explicitly, and differ
  from a model with another chunk length (the same weights: chunking only changes rounding).
  delta_impl="chunked": on CPU "auto" runs the per-token scan outside differentiation."""
  chunk = sj.ops.default_chunk_size(head_dim=make().config.resolved_head_dim)
  t = 2 * chunk + 7
  toks = tokens((B, t))

  def logits(chunk_size):
    params = make("AG", "none", chunk_size=chunk_size, delta_impl="chunked")
    assert params.config.resolved_chunk_size == (chunk if chunk_size is None else chunk_size)
    cache = sj.init_cache(params, B, capacity=t)
    return sj.wake(params, sj.init_state(params, B), cache, toks)[0]

  default = logits(None)
  np.testing.assert_array_equal(default, logits(chunk))
  assert not np.array_equal(default, logits(chunk // 4))


def test_for_backend_makes_the_choices_that_backend_would_make():
  """ModelConfig.for_backend: unset dtype and chunk_size, and delta_impl="auto", become what
  the named backend would trace, on any host; set values are kept. Traced here with the GPU's
  choices, `sleep` runs the chunked op (no loop over the window's 8 tokens), where this host's
  "auto" on a CPU runs the per-token scan."""
  from test_ops import _scan_lengths  # pylint: disable=g-import-not-at-top

  base = make().config                                       # head_dim 16
  gpu = base.for_backend("gpu")
  assert (gpu.dtype, gpu.chunk_size, gpu.delta_impl) == ("bfloat16", 64, "chunked")
  assert gpu.for_backend("gpu") == gpu
  assert base.for_backend("tpu").replace(dtype=None, chunk_size=None) == base.replace(
      delta_impl="chunked")
  cpu = base.for_backend("cpu")
  assert (cpu.dtype, cpu.chunk_size, cpu.delta_impl) == (
      "float32", sj.ops.default_chunk_size("cpu", 16), "auto")
  kept = base.replace(dtype="float16", chunk_size=8, delta_impl="scan").for_backend("tpu")
  assert (kept.dtype, kept.chunk_size, kept.delta_impl) == ("float16", 8, "scan")
  with pytest.raises(ValueError, match=r"for_backend: backend must be one of .*'tpu'.*'cuda'"):
    base.for_backend("cuda")

  params = make()
  state, ctx = sj.init_state(params, B), tokens((B, L))

  def sleep_scans(config):
    return _scan_lengths(jax.make_jaxpr(
        lambda s, c: sj.sleep(params.replace(config=config), s, c, 3))(state, ctx).jaxpr)

  assert L not in sleep_scans(gpu) and 3 in sleep_scans(gpu)
  if jax.default_backend() == "cpu":
    assert L in sleep_scans(base)


def test_dense_keeps_nn_dense_parameters_and_rounds_one_token_products_once():
  """layers.Dense: the parameter of nn.Dense (same name, shape, initial values); over several
  tokens the same product as nn.Dense; on one token in bf16 the float32 sum of the bf16-rounded
  products, rounded to bf16 once (within one bf16 rounding of that reference)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from sleep_jax.layers import Dense  # pylint: disable=g-import-not-at-top

  key = jax.random.key(3)
  x = jax.random.normal(jax.random.key(4), (2, 5, 96))
  ours, theirs = Dense(160, jnp.bfloat16), nn.Dense(
      160, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.float32,
      kernel_init=nn.initializers.lecun_normal())
  p_ours, p_theirs = ours.init(key, x), theirs.init(key, x)
  assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
  np.testing.assert_array_equal(p_ours["params"]["kernel"], p_theirs["params"]["kernel"])
  np.testing.assert_array_equal(ours.apply(p_ours, x), theirs.apply(p_theirs, x))

  one = x[:, :1]
  y = ours.apply(p_ours, one)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 1, 160)
  w = np.asarray(p_ours["params"]["kernel"].astype(jnp.bfloat16), np.float64)
  reference = np.asarray(one.astype(jnp.bfloat16), np.float64) @ w
  err = np.abs(np.asarray(y, np.float64) - reference)
  assert np.all(err <= 2 ** -8 * np.abs(reference) + 1e-6), err.max()
  f32 = Dense(160, jnp.float32)
  np.testing.assert_array_equal(f32.apply(p_ours, one), theirs.clone(dtype=jnp.float32).apply(
      p_theirs, one))


def test_delta_unroll_writes_out_the_chunk_loops_and_changes_no_result():
  """delta_unroll at least the chunks of a pass (2 here) leaves no chunk loop in the loss's
  gradient program (the scan over the N passes stays; on CPU "auto" runs the chunked form
  only under differentiation); loss and gradients equal the rolled loops' to float32
  rounding."""
  params = make("AG", "hard", chunk_size=4)           # L = 8: two chunks per window pass
  batch = {"tokens": tokens((B, 3 * L)), "targets": tokens((B, 3 * L), seed=2),
           "loss_mask": jnp.ones((B, 3 * L), bool)}

  def grad_fn(p):
    return jax.jit(jax.value_and_grad(lambda p: sj.loss(p, batch, 2)[0]))

  unrolled = params.replace(config=params.config.replace(delta_unroll=2))
  loss_rolled, grads_rolled = grad_fn(params)(params)
  loss_unrolled, grads_unrolled = grad_fn(unrolled)(unrolled)
  assert_close(loss_unrolled, loss_rolled)
  assert_close(grads_unrolled.weights, grads_rolled.weights, tol=1e-4)

  def loops(p):
    return grad_fn(p).lower(p).as_text().count("stablehlo.while")

  # Rolled: the chunk loops of every fast-weight pass besides the scans over passes.
  assert loops(unrolled) < loops(params)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("d_model", -1), ("num_heads", 3), ("layout", "AXG"), ("layout", ""),
    ("window", 0), ("eviction", "soft"), ("rule", "oja"), ("dtype", "int8"), ("remat", "all"),
    ("delta_impl", "fast"), ("chunk_size", 0), ("attention_impl", "flash"), ("conv_size", 0),
    ("delta_unroll", 0), ("delta_unroll", True),
])
def test_config_validation_names_the_field(field, value):
  kwargs = dict(vocab_size=VOCAB, d_model=32, num_heads=2)
  kwargs[field] = value
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    sj.ModelConfig(**kwargs)


def test_input_validation_messages():
  params = make()
  state = sj.init_state(params, B)
  with pytest.raises(ValueError, match="one window"):
    sj.sleep(params, state, tokens((B, L + 1)), 2)
  with pytest.raises(ValueError, match="integer token ids"):
    sj.sleep(params, state, jnp.zeros((B, L), jnp.float32), 2)
  with pytest.raises(ValueError, match=">= 0"):
    sj.sleep(params, state, tokens((B, L)), -1)
  with pytest.raises(ValueError, match="state\\[1\\]"):
    sj.sleep(params, sj.init_state(params, B + 1), tokens((B, L)), 1)
  with pytest.raises(ValueError, match="do not fit"):
    sj.wake(params, state, sj.init_cache(params, B), tokens((B, L + 1)))
  # Under jit the host check cannot run: an overflowing call is poisoned, not silently clamped.
  jitted_wake = jax.jit(sj.wake)
  full = sj.init_cache(params, B).replace(length=jnp.int32(L - 1))
  logits, _, _ = jitted_wake(params, state, full, tokens((B, 1)))
  assert np.all(np.isfinite(np.asarray(logits)))
  logits, _, _ = jitted_wake(params, state, full.replace(length=jnp.int32(L)), tokens((B, 1)))
  assert np.all(np.isnan(np.asarray(logits)))
  with pytest.raises(ValueError, match="multiple of"):
    sj.loss(params, {"tokens": tokens((B, L + 2)), "targets": tokens((B, L + 2)),
                     "loss_mask": jnp.ones((B, L + 2), bool)}, 1)
  with pytest.raises(ValueError, match="grad_passes"):
    sj.loss(params, _batch(2, [1]), 2, grad_passes=3)
  with pytest.raises(TypeError, match="sleep_jax.init"):
    sj.sleep({"not": "params"}, state, tokens((B, L)), 1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_stream_wake_step_copies_no_kv_buffer(eviction):
  """A one-token wake of `Stream` updates the donated window cache in place: its compiled program
  aliases inputs to outputs and holds no copy of a K/V buffer. The same step without donation
  (the contrast that shows the check can see copies) copies them."""
  cfg = sj.ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, layout="AG", window=L,
                       eviction=eviction, dtype="float32")
  params = sj.init(cfg, jax.random.key(0))
  stream = streaming.Stream(params, B, 2)
  kv = stream._ss.cache.layers[0]["k"]
  kv_shape = f"f32[{','.join(map(str, kv.shape))}]"
  args = (params, stream._ss, tokens((B, 1)), jnp.int32(0))

  def kv_copies(fn):
    text = fn.lower(*args).compile().as_text()
    return text, [line for line in text.splitlines() if kv_shape in line and " copy(" in line]

  text, copies = kv_copies(streaming._wake_chunk)
  assert "input_output_alias" in text and not copies, copies[:3]
  _, copies = kv_copies(jax.jit(streaming._wake_chunk.__wrapped__))
  assert copies
