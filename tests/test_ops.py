"""Tests of sleep_jax.ops: the fast-weight recurrence against a float64 numpy reference
written here from the equations, chunked == scan (values and gradients), carried state,
the decode step, and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import ops

RULES = ("gated_delta", "hebbian")


# ------------------------------------------------------------------------- reference


def reference(q, k, v, beta, log_alpha, state, scale, rule):
  """Token-by-token float64 recurrence, straight from the equations (row vectors, per
  head): S_t = a S + k (x) b (v - a S^T k) or S_t = a S + b k (x) v; o_t = scale S_t^T q_t.
  Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta, log_alpha [B, T, H]; state
  [B, H, Dk, Dv]."""
  q, k, v, beta, log_alpha, s = (np.asarray(x, np.float64)
                                 for x in (q, k, v, beta, log_alpha, state))
  outputs = []
  for t in range(q.shape[1]):
    a = np.exp(log_alpha[:, t])[:, :, None, None]
    b = beta[:, t][:, :, None, None]
    kt, vt = k[:, t][:, :, :, None], v[:, t][:, :, None, :]   # column k, row v
    if rule == "gated_delta":
      retrieved = np.einsum("bhkv,bhk->bhv", a * s, k[:, t])[:, :, None, :]
      s = a * s + kt * (b * (vt - retrieved))
    else:
      s = a * s + b * kt * vt
    outputs.append(scale * np.einsum("bhkv,bhk->bhv", s, q[:, t]))
  return np.stack(outputs, axis=1), s


def make_inputs(seed, b=2, t=37, h=3, dk=5, dv=7, dtype=np.float32):
  """Realistic inputs: unit-norm q and k, beta in (0, 1), log_alpha in [-2, 0] with some
  exact zeros and some -30 (a near-total reset), and a nonzero initial state."""
  rng = np.random.default_rng(seed)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  q = unit(rng.standard_normal((b, t, h, dk)))
  k = unit(rng.standard_normal((b, t, h, dk)))
  v = rng.standard_normal((b, t, h, dv))
  beta = rng.uniform(0.02, 0.98, (b, t, h))
  log_alpha = rng.uniform(-2.0, 0.0, (b, t, h))
  special = rng.uniform(size=(b, t, h))
  log_alpha[special < 0.15] = 0.0
  log_alpha[special > 0.9] = -30.0
  state = rng.standard_normal((b, h, dk, dv))
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return (cast(q), cast(k), cast(v), jnp.asarray(beta, jnp.float32),
          jnp.asarray(log_alpha, jnp.float32), jnp.asarray(state, jnp.float32))


def assert_close(actual, expected, rtol, floor=1.0):
  """|actual - expected| <= rtol * max(|expected|, floor), elementwise."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = np.abs(actual - expected) / np.maximum(np.abs(expected), floor)
  assert np.all(np.isfinite(actual)), "non-finite values"
  assert err.max() <= rtol, f"max relative error {err.max():.3g} > {rtol:.3g}"


# Compiled once per shape and static setting: op-by-op dispatch would compile every
# primitive separately and dominate the test time.
gated_delta_rule = jax.jit(ops.gated_delta_rule,
                           static_argnames=("scale", "impl", "chunk_size", "rule", "unroll"))


def run(inputs, **kwargs):
  q, k, v, beta, log_alpha, state = inputs
  return gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, **kwargs)


# ------------------------------------------------------------------------- values


@pytest.mark.parametrize("rule, impl, chunk_size", [
    ("gated_delta", "scan", 64), ("hebbian", "scan", 64),
    ("gated_delta", "chunked", 16), ("hebbian", "chunked", 16),   # 37 = 2 * 16 + 5
    ("gated_delta", "chunked", 1),                                # one token per chunk
    ("gated_delta", "chunked", 64),                               # one padded chunk of 37
])
def test_float32_matches_float64_reference(rule, impl, chunk_size):
  inputs = make_inputs(0)
  scale = 0.8   # not the default, so the scale is really applied
  o, final_state = run(inputs, scale=scale, impl=impl, rule=rule, chunk_size=chunk_size)
  o_ref, s_ref = reference(*inputs, scale, rule)
  assert o.dtype == jnp.float32 and final_state.dtype == jnp.float32
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["scan", "chunked"])
def test_bfloat16_inputs_match_reference_loosely(rule, impl):
  inputs = make_inputs(1, dtype=jnp.bfloat16)
  o, final_state = run(inputs, impl=impl, rule=rule, chunk_size=16)
  assert o.dtype == jnp.bfloat16 and final_state.dtype == jnp.float32
  # The reference sees the same bf16-rounded inputs, so only the op's own rounding counts.
  o_ref, s_ref = reference(*(np.asarray(x, np.float32) for x in inputs), 5 ** -0.5, rule)
  assert_close(o, o_ref, 2e-2)        # bf16 outputs: 8 significant bits
  assert_close(final_state, s_ref, 2e-3)


def test_default_scale_and_zero_initial_state():
  q, k, v, beta, log_alpha, _ = make_inputs(2)
  o, final_state = gated_delta_rule(q, k, v, beta, log_alpha, impl="chunked", chunk_size=8)
  o_ref, s_ref = reference(q, k, v, beta, log_alpha, np.zeros((2, 3, 5, 7)), 5 ** -0.5,
                           "gated_delta")
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)


def test_strong_decay_keeps_relative_accuracy():
  """A chunk whose log-decays sum to about -1000: pairwise decays of neighbouring tokens
  must stay accurate (sums over their own tokens, not differences of large sums), and
  nothing overflows."""
  inputs = list(make_inputs(3, b=1, t=32, h=2))
  log_alpha = np.asarray(inputs[4]).copy()
  log_alpha[:, :6] = -200.0       # then ordinary gates: neighbours decay by exp(-2..0)
  inputs[4] = jnp.asarray(log_alpha)
  o, final_state = run(inputs, impl="chunked", chunk_size=32)
  o_ref, s_ref = reference(*inputs, 5 ** -0.5, "gated_delta")
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)


# ------------------------------------------------------------------------- gradients


def _functional(impl, rule, cotangents, chunk_size=8):
  co, cs = cotangents

  def f(q, k, v, beta, log_alpha, state):
    o, final_state = ops.gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state,
                                          impl=impl, rule=rule, chunk_size=chunk_size)
    return jnp.sum(o * co) + jnp.sum(final_state * cs)

  return f


@pytest.mark.parametrize("rule", RULES)
def test_chunked_gradients_equal_scan_gradients(rule):
  inputs = make_inputs(4, t=21)
  rng = np.random.default_rng(5)
  cotangents = (jnp.asarray(rng.standard_normal((2, 21, 3, 7)), jnp.float32),
                jnp.asarray(rng.standard_normal((2, 3, 5, 7)), jnp.float32))
  argnums = tuple(range(6))
  grads = {impl: jax.jit(jax.grad(_functional(impl, rule, cotangents), argnums))(*inputs)
           for impl in ("scan", "chunked")}
  names = ("q", "k", "v", "beta", "log_alpha", "initial_state")
  for name, g_scan, g_chunk in zip(names, grads["scan"], grads["chunked"]):
    assert np.all(np.isfinite(np.asarray(g_chunk))), name
    scale = float(np.sqrt(np.mean(np.square(np.asarray(g_scan)))))
    err = float(np.max(np.abs(np.asarray(g_chunk) - np.asarray(g_scan)))) / scale
    assert err < 1e-4, f"{name}: gradient error {err:.3g} relative to its rms"


@pytest.mark.parametrize("rule", RULES)
def test_bfloat16_chunked_gradients_match_float32_scan(rule):
  """The hand-written backward with half-precision operands: gradients of bf16 inputs
  against the float32 scan's on the same (bf16-rounded) values, to bf16 accuracy. Several
  chunks of 16 plus a padded one, so the reverse recurrence and the padding are crossed."""
  inputs = make_inputs(8, t=53, dtype=jnp.bfloat16)
  rng = np.random.default_rng(9)
  cotangents = (jnp.asarray(rng.standard_normal((2, 53, 3, 7)), jnp.float32),
                jnp.asarray(rng.standard_normal((2, 3, 5, 7)), jnp.float32))
  argnums = tuple(range(6))
  chunked = jax.jit(jax.grad(_functional("chunked", rule, cotangents, chunk_size=16),
                             argnums))(*inputs)
  as_f32 = [jnp.asarray(x, jnp.float32) for x in inputs]
  scan = jax.jit(jax.grad(_functional("scan", rule, cotangents), argnums))(*as_f32)
  names = ("q", "k", "v", "beta", "log_alpha", "initial_state")
  for name, x, g_chunk, g_scan in zip(names, inputs, chunked, scan):
    assert g_chunk.dtype == x.dtype, name
    g_scan = np.asarray(g_scan, np.float64)
    err = np.linalg.norm(np.asarray(g_chunk, np.float64) - g_scan) / np.linalg.norm(g_scan)
    assert err < 2e-2, f"{name}: relative gradient error {err:.3g}"


@pytest.mark.parametrize("rule", RULES)
def test_chunked_gradient_matches_float64_finite_difference(rule):
  """Directional derivative of <cotangent, (o, S_T)> along a random direction in all six
  inputs: the chunked form's VJP against central differences of the numpy reference."""
  inputs = make_inputs(6, t=13)
  rng = np.random.default_rng(7)
  cotangents = (rng.standard_normal((2, 13, 3, 7)), rng.standard_normal((2, 3, 5, 7)))
  directions = [rng.standard_normal(x.shape) for x in inputs]
  f = _functional("chunked", rule, tuple(jnp.asarray(c, jnp.float32) for c in cotangents),
                  chunk_size=4)
  grads = jax.jit(jax.grad(f, tuple(range(6))))(*inputs)
  analytic = sum(float(np.sum(np.asarray(g, np.float64) * d))
                 for g, d in zip(grads, directions))

  def objective(eps):
    shifted = [np.asarray(x, np.float64) + eps * d for x, d in zip(inputs, directions)]
    o, s = reference(*shifted, 5 ** -0.5, rule)
    return np.sum(o * cotangents[0]) + np.sum(s * cotangents[1])

  eps = 1e-5
  numeric = (objective(eps) - objective(-eps)) / (2 * eps)
  assert abs(analytic - numeric) <= 1e-4 * max(abs(numeric), 1.0), (analytic, numeric)


# ------------------------------------------------------------------------- state passing


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("split", [1, 20])
def test_split_with_carried_state_equals_one_call(rule, split):
  q, k, v, beta, log_alpha, state = make_inputs(8)
  kw = dict(impl="chunked", chunk_size=8, rule=rule)
  o_all, s_all = gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, **kw)
  first = [x[:, :split] for x in (q, k, v, beta, log_alpha)]
  second = [x[:, split:] for x in (q, k, v, beta, log_alpha)]
  o1, s1 = gated_delta_rule(*first, initial_state=state, **kw)
  o2, s2 = gated_delta_rule(*second, initial_state=s1, **kw)
  assert_close(jnp.concatenate([o1, o2], axis=1), o_all, 1e-5)
  assert_close(s2, s_all, 1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_decode_steps_equal_sequence_call(rule):
  q, k, v, beta, log_alpha, state = make_inputs(9, t=9)
  o_scan, s_scan = gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state,
                                    impl="scan", rule=rule)
  step = jax.jit(lambda *x: ops.gated_delta_step(*x, rule=rule))
  s = state
  for t in range(q.shape[1]):
    o_t, s = step(q[:, t], k[:, t], v[:, t], beta[:, t], log_alpha[:, t], s)
    assert_close(o_t, o_scan[:, t], 1e-6)
    for impl in ("scan", "chunked"):
      if t == 0:   # the step is the T = 1 case of the sequence op
        o_one, s_one = gated_delta_rule(
            q[:, :1], k[:, :1], v[:, :1], beta[:, :1], log_alpha[:, :1],
            initial_state=state, impl=impl, rule=rule)
        assert_close(o_one[:, 0], o_t, 1e-6)
        assert_close(s_one, s, 1e-6)
  assert_close(s, s_scan, 1e-6)
  o_ref, s_ref = reference(q, k, v, beta, log_alpha, state, 5 ** -0.5, rule)
  assert_close(s, s_ref, 1e-5)


def test_step_keeps_dtype_and_state_float32():
  q, k, v, beta, log_alpha, state = make_inputs(10, t=1, dtype=jnp.bfloat16)
  o, s = ops.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], log_alpha[:, 0], state)
  assert o.dtype == jnp.bfloat16 and o.shape == (2, 3, 7)
  assert s.dtype == jnp.float32 and s.shape == (2, 3, 5, 7)


# ------------------------------------------------------------------------- transforms


def test_vmap_and_auto():
  """vmap over an extra leading axis equals a loop; "auto" equals an explicit impl."""
  stacked = [jnp.stack([a, b]) for a, b in zip(make_inputs(11, t=10), make_inputs(12, t=10))]
  fn = lambda *x: run(x, impl="chunked", chunk_size=4)  # noqa: E731
  o_v, s_v = jax.jit(jax.vmap(fn))(*stacked)
  for i in range(2):
    o_i, s_i = fn(*(x[i] for x in stacked))
    assert_close(o_v[i], o_i, 1e-6)
    assert_close(s_v[i], s_i, 1e-6)
  o_auto, _ = run([x[0] for x in stacked], chunk_size=4)
  o_ref, _ = reference(*(x[0] for x in stacked), 5 ** -0.5, "gated_delta")
  assert_close(o_auto, o_ref, 1e-5)


def _scan_lengths(jaxpr) -> list[int]:
  """The lengths of every lax.scan in a jaxpr, nested calls and custom rules included."""
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          lengths += _scan_lengths(sub)
  return lengths


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what auto runs on CPU")
@pytest.mark.parametrize("rule", RULES)
def test_auto_on_cpu_runs_the_scan_forward_and_the_chunked_form_under_grad(rule):
  """On CPU, "auto" is the per-token scan when nothing differentiates it (one scan of T = 37
  steps) and the chunked form under jax.grad (loops over 5 chunks of 8, no 37-step loop).
  Values against the float64 reference; gradients, the readout scale's included, against
  the scan's autodiff."""
  assert ops.gated_delta.resolve_impl("auto", "cpu") == "scan+chunked"
  inputs = make_inputs(19)
  scale = jnp.float32(0.8)

  def call(impl, *args):
    *xs, state, s = args
    return ops.gated_delta_rule(*xs, initial_state=state, scale=s, impl=impl, rule=rule,
                                chunk_size=8)

  def loss(impl, *args):
    o, final_state = call(impl, *args)
    return jnp.sum(jnp.sin(o)) + jnp.sum(final_state * final_state)

  forward = jax.make_jaxpr(lambda *a: call("auto", *a))(*inputs, scale)
  assert _scan_lengths(forward.jaxpr) == [37]
  grad = jax.grad(lambda *a: loss("auto", *a), argnums=tuple(range(7)))
  lengths = _scan_lengths(jax.make_jaxpr(grad)(*inputs, scale).jaxpr)
  assert 37 not in lengths and 5 in lengths, lengths

  o, final_state = jax.jit(lambda *a: call("auto", *a))(*inputs, scale)
  o_ref, s_ref = reference(*inputs, 0.8, rule)
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)
  grads = jax.jit(grad)(*inputs, scale)
  grads_scan = jax.jit(jax.grad(lambda *a: loss("scan", *a), argnums=tuple(range(7))))(
      *inputs, scale)
  names = ("q", "k", "v", "beta", "log_alpha", "initial_state", "scale")
  for name, g, g_scan in zip(names, grads, grads_scan):
    rms = float(np.sqrt(np.mean(np.square(np.asarray(g_scan)))))
    err = float(np.max(np.abs(np.asarray(g) - np.asarray(g_scan)))) / rms
    assert err < 1e-4, f"{name}: gradient error {err:.3g} relative to its rms"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled program")
def test_cpu_gradient_products_contract_the_last_axis_of_their_left_operand():
  """In the compiled CPU program of the chunked form's gradient, every batched matrix product
  contracts the last axis of its left operand: XLA:CPU runs one that contracts the
  second-to-last 2.5-4.5x slower (gated_delta_chunked._transposed keeps a transposed copy)."""
  import re  # pylint: disable=g-import-not-at-top

  inputs = make_inputs(23, t=32, dk=16, dv=16)

  def loss(*args):
    o, state = run(args, impl="chunked", chunk_size=16)
    return jnp.sum(o) + jnp.sum(state)

  hlo = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*inputs).compile().as_text()
  dots = re.findall(r"= f32\[([\d,]*)\]\S* dot\(.*?lhs_batch_dims=\{([\d,]*)\}, "
                    r"lhs_contracting_dims=\{(\d+)\}", hlo)
  matrix_products = [(batch, int(axis)) for shape, batch, axis in dots
                     if batch and shape.count(",") + 1 == batch.count(",") + 3]
  assert len(matrix_products) >= 10, dots
  for batch, axis in matrix_products:
    assert axis == batch.count(",") + 2, (batch, axis)


def test_chunk_size_none_is_the_backends_default():
  """chunk_size=None runs the backend's chunk length for the key size (Dk = 5): bit-identical
  to passing that length, and distinguishable from another length (so the identity says which
  one ran)."""
  chunk = ops.default_chunk_size(head_dim=5)
  inputs = make_inputs(17, t=3 * chunk - 5)
  o_none, s_none = run(inputs, impl="chunked", chunk_size=None)
  o_same, s_same = run(inputs, impl="chunked", chunk_size=chunk)
  o_other, _ = run(inputs, impl="chunked", chunk_size=chunk // 2)
  np.testing.assert_array_equal(o_none, o_same)
  np.testing.assert_array_equal(s_none, s_same)
  assert not np.array_equal(o_none, o_other)
  o_ref, s_ref = reference(*inputs, 5 ** -0.5, "gated_delta")
  assert_close(o_none, o_ref, 1e-5)
  assert_close(s_none, s_ref, 1e-5)


def test_default_chunk_size_per_backend_and_key_size():
  """CPU: 32, and 16 for keys of at most 32; GPU and TPU: 64 for any key size."""
  assert [ops.default_chunk_size("cpu", d) for d in (None, 8, 32, 33, 64, 128)] == [
      32, 16, 16, 32, 32, 32]
  for backend in ("gpu", "tpu"):
    assert {ops.default_chunk_size(backend, d) for d in (None, 16, 128)} == {64}


@pytest.mark.parametrize("unroll", [2, 3, True])
def test_unrolled_chunk_loop_matches_reference_and_scan_gradients(unroll):
  """37 tokens in chunks of 8 are 5 chunks: unroll 2 and 3 leave a remainder, True writes
  out every chunk step (no loop left in the program). Values against the float64
  reference, gradients against the per-token scan's."""
  inputs = make_inputs(18)
  o, final_state = run(inputs, impl="chunked", chunk_size=8, unroll=unroll)
  o_ref, s_ref = reference(*inputs, 5 ** -0.5, "gated_delta")
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)

  rng = np.random.default_rng(19)
  cotangents = (jnp.asarray(rng.standard_normal((2, 37, 3, 7)), jnp.float32),
                jnp.asarray(rng.standard_normal((2, 3, 5, 7)), jnp.float32))

  def loss(impl, unroll):
    def f(*args):
      o, s = ops.gated_delta_rule(*args[:5], initial_state=args[5], impl=impl, chunk_size=8,
                                  unroll=unroll)
      return jnp.sum(o * cotangents[0]) + jnp.sum(s * cotangents[1])
    return jax.jit(jax.grad(f, tuple(range(6))))

  unrolled, scan = loss("chunked", unroll), loss("scan", 1)
  for name, g, g_ref in zip(("q", "k", "v", "beta", "log_alpha", "initial_state"),
                            unrolled(*inputs), scan(*inputs)):
    rms = float(np.sqrt(np.mean(np.square(np.asarray(g_ref)))))
    err = float(np.max(np.abs(np.asarray(g) - np.asarray(g_ref)))) / rms
    assert err < 1e-4, f"{name}: gradient error {err:.3g} relative to its rms"
  loops = unrolled.lower(*inputs).as_text().count("stablehlo.while")
  assert (loops == 0) == (unroll is True), loops


# ------------------------------------------------------------------------- validation


def _bad_calls():
  q, k, v, beta, log_alpha, state = make_inputs(13, t=4)
  good = dict(q=q, k=k, v=v, beta=beta, log_alpha=log_alpha)
  cases = [
      (dict(good, q=q[0]), {}, "q must have rank 4"),
      (dict(good, k=k[..., :4]), {}, "k must have the shape of q"),
      (dict(good, v=v[:, :3]), {}, "v must be"),
      (dict(good, beta=beta[:, :, :2]), {}, "beta must be"),
      (dict(good, log_alpha=log_alpha[..., None]), {}, "log_alpha must have rank 3"),
      (dict(good, q=jnp.ones(q.shape, jnp.int32)), {}, "q must have a floating dtype"),
      (good, dict(initial_state=state[:, :, :4]), "initial_state must be"),
      (good, dict(impl="fast"), "impl must be one of"),
      (good, dict(rule="oja"), "rule must be one of"),
      (good, dict(chunk_size=0), "chunk_size must be an int >= 1"),
      (good, dict(chunk_size=8.0), "chunk_size must be an int >= 1"),
      (good, dict(unroll=0), "unroll must be an int >= 1 or True"),
      (good, dict(unroll=False), "unroll must be an int >= 1 or True"),
      (good, dict(unroll=2.0), "unroll must be an int >= 1 or True"),
  ]
  return cases


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_sequence_op_rejects_bad_inputs(case):
  arrays, kwargs, message = _bad_calls()[case]
  with pytest.raises(ValueError, match=message):
    ops.gated_delta_rule(arrays["q"], arrays["k"], arrays["v"], arrays["beta"],
                         arrays["log_alpha"], **kwargs)


def test_step_rejects_bad_inputs():
  q, k, v, beta, log_alpha, state = make_inputs(14, t=1)
  q, k, v, beta, log_alpha = (x[:, 0] for x in (q, k, v, beta, log_alpha))
  ops.gated_delta_step(q, k, v, beta, log_alpha, state)   # the well-formed call works
  with pytest.raises(ValueError, match="state must be"):
    ops.gated_delta_step(q, k, v, beta, log_alpha, state[..., :3])
  with pytest.raises(ValueError, match="q must have rank 3"):
    ops.gated_delta_step(q[None], k, v, beta, log_alpha, state)
  with pytest.raises(ValueError, match="beta must be"):
    ops.gated_delta_step(q, k, v, beta[:, :1], log_alpha, state)
  with pytest.raises(ValueError, match="rule must be one of"):
    ops.gated_delta_step(q, k, v, beta, log_alpha, state, rule="delta")
