"""Tests of the Pallas kernel of the chunked delta rule (sleep_jax/ops/gated_delta_pallas.py).

On CPU the kernels run in Pallas' interpreter, which executes the same kernel body and block
indexing as the compiled kernels: values are checked against the float64 token-by-token
reference of tests/test_ops.py and against an independent NumPy loop over chunks. The Triton
lowering is checked by exporting for CUDA (no GPU needed: it produces the Triton module), the
Mosaic one by compiling for a TPU v5e topology (needs libtpu, marked `tpu_aot`).
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from benchmarks import gpu_aot
from sleep_jax import ModelConfig
from sleep_jax import ops
from sleep_jax.ops import gated_delta_pallas
from test_ops import RULES, assert_close, make_inputs, reference, run

_TRITON_CALL = "__gpu$xla.gpu.triton"


def _export_for_cuda(fn, *args):
  """``jax.export`` of ``fn`` for CUDA on a host without a GPU (jax 0.11's Triton lowering
  needs to be told which GPU: an H100)."""
  with gpu_aot.targeting("h100"):
    return export.export(
        fn, platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("t", [37, 5])  # 2 chunks + 5 tokens; one short, padded chunk
def test_float32_matches_float64_reference(rule, t):
  inputs = make_inputs(0, t=t, dk=16, dv=32)
  o, final_state = run(inputs, scale=0.8, impl="pallas", rule=rule, chunk_size=16)
  o_ref, s_ref = reference(*inputs, 0.8, rule)
  assert o.dtype == jnp.float32 and final_state.dtype == jnp.float32
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_bfloat16_error_stays_at_bfloat16_rounding(rule):
  """With bf16 inputs the kernel feeds the state to its products as bf16 (the pure-JAX scan
  keeps it float32): outputs stay within twice the pure-JAX form's error against float64, and
  the final state within bf16's unit roundoff (2^-8) of its largest entry."""
  inputs = make_inputs(1, t=64, dk=16, dv=16, dtype=jnp.bfloat16)
  o_ref, s_ref = reference(*inputs, 0.25, rule)
  errors = {}
  for impl in ("pallas", "chunked"):
    o, final_state = run(inputs, scale=0.25, impl=impl, rule=rule, chunk_size=16)
    assert o.dtype == jnp.bfloat16 and final_state.dtype == jnp.float32
    errors[impl] = (np.max(np.abs(np.asarray(o, np.float64) - o_ref)),
                    np.max(np.abs(np.asarray(final_state, np.float64) - s_ref)))
  assert errors["pallas"][0] <= 2 * errors["chunked"][0], errors
  assert errors["pallas"][1] <= 2.0 ** -8 * np.max(np.abs(s_ref)), errors


@pytest.mark.parametrize("rule", RULES)
def test_gradients_equal_the_chunked_form(rule):
  inputs = make_inputs(2, t=40, dk=16, dv=16)
  rng = np.random.default_rng(3)
  co = jnp.asarray(rng.standard_normal((2, 40, 3, 16)), jnp.float32)
  cs = jnp.asarray(rng.standard_normal((2, 3, 16, 16)), jnp.float32)

  def objective(impl):
    def f(*args):
      o, s = ops.gated_delta_rule(*args[:5], initial_state=args[5], impl=impl, rule=rule,
                                  chunk_size=16)
      return jnp.sum(o * co) + jnp.sum(s * cs)
    return jax.jit(jax.grad(f, argnums=tuple(range(6))))

  for g_kernel, g_pure in zip(objective("pallas")(*inputs), objective("chunked")(*inputs)):
    scale = float(np.sqrt(np.mean(np.square(np.asarray(g_pure)))))
    assert float(np.max(np.abs(np.asarray(g_kernel - g_pure)))) <= 1e-5 * scale


def _fused_inputs(seed, g=3, n=4, c=16, dk=16, dv=32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.3  # noqa: E731
  return (normal(g, n, c, dk), normal(g, n, c, dk), normal(g, n, c, dv), normal(g, n, c, dk),
          normal(g, n, c, c), rng.uniform(0.3, 1.0, (g, n)).astype(np.float32),
          normal(g, dk, dv))


def _fused_numpy(qg, w, u0, kend, scores, decay, state, correct):
  """The fused function chunk by chunk, in float64: u = u0 - w S, o = qg S + P u,
  S <- a S + kend^T u."""
  qg, w, u0, kend, scores, decay, state = (np.asarray(x, np.float64) for x in
                                           (qg, w, u0, kend, scores, decay, state))
  outputs = np.zeros(qg.shape[:3] + (u0.shape[-1],))
  for n in range(qg.shape[1]):
    u = u0[:, n] - (w[:, n] @ state if correct else 0.0)
    outputs[:, n] = qg[:, n] @ state + scores[:, n] @ u
    state = decay[:, n, None, None] * state + np.swapaxes(kend[:, n], 1, 2) @ u
  return outputs, state


KERNELS = {"gpu": gated_delta_pallas._call_gpu, "tpu": gated_delta_pallas._call_tpu}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("correct", [True, False])
def test_fused_backward_equals_autodiff_of_the_reference(correct, dtype):
  """The hand-written VJP of fused_recurrence against jax.vjp of its pure-JAX definition
  (``reference``, a lax.scan over chunks), for every input, on the same cotangents."""
  qg, w, u0, kend, scores, decay, state = _fused_inputs(7)
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  inputs = (cast(qg), cast(w), jnp.asarray(u0), cast(kend), cast(scores), jnp.asarray(decay),
            jnp.asarray(state))
  rng = np.random.default_rng(8)
  cotangents = (jnp.asarray(rng.standard_normal(u0.shape), jnp.float32),
                jnp.asarray(rng.standard_normal(state.shape), jnp.float32))

  def vjp_of(fn):
    return jax.jit(lambda *a: jax.vjp(fn, *a)[1](cotangents))(*inputs)

  got = vjp_of(lambda *a: gated_delta_pallas.fused_recurrence(*a, correct))
  expected = vjp_of(functools.partial(gated_delta_pallas.reference, correct=correct))
  names = ("qg", "w", "u0", "kend", "scores", "decay", "initial_state")
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, x, g, e in zip(names, inputs, got, expected):
    assert g.dtype == x.dtype, name
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    if not correct and name == "w":
      assert not np.any(g) and not np.any(e)       # the Hebbian rule does not read w
      continue
    err = np.linalg.norm(g - e) / np.linalg.norm(e)
    assert err <= tolerance, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("call", sorted(KERNELS))
@pytest.mark.parametrize("correct", [True, False])
def test_both_kernels_equal_the_chunk_loop(call, correct):
  """The Triton-shaped kernel (chunk loop inside) and the Mosaic-shaped one (chunk grid axis,
  state in scratch), each in the interpreter, against a NumPy loop over chunks."""
  inputs = _fused_inputs(4)
  kernel = KERNELS[call]
  o, state = jax.jit(lambda *a: kernel(*a, correct=correct, interpret=True))(*inputs)
  o_ref, s_ref = _fused_numpy(*inputs, correct)
  assert_close(o, o_ref, 1e-5)
  assert_close(state, s_ref, 1e-5)


@pytest.mark.parametrize("call", sorted(KERNELS))
def test_column_blocks_each_own_their_columns(call):
  """Dv = 256 is split over programs (4 x 64 columns on GPU, 2 x 128 on TPU)."""
  inputs = _fused_inputs(5, g=2, n=2, dv=256)
  kernel = KERNELS[call]
  o, state = jax.jit(lambda *a: kernel(*a, correct=True, interpret=True))(*inputs)
  o_ref, s_ref = _fused_numpy(*inputs, True)
  assert_close(o, o_ref, 1e-5)
  assert_close(state, s_ref, 1e-5)


def _bf16_operands(seed=6, g=4, n=8, c=64, dk=128, dv=128):
  qg, w, u0, kend, scores, decay, state = _fused_inputs(seed, g, n, c, dk, dv)
  cast = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  return (cast(qg), cast(w), jnp.asarray(u0), cast(kend), cast(scores), jnp.asarray(decay),
          jnp.asarray(state))


def test_cuda_lowering_emits_one_triton_kernel():
  """Pallas' Triton lowering accepts the kernel at the benchmark's block sizes (chunk 64,
  Dk = Dv = 128, bf16). Compiling the Triton module needs a GPU and is not checked here."""
  args = _bf16_operands()
  fn = jax.jit(lambda *a: gated_delta_pallas.fused_recurrence(*a, True))
  text = _export_for_cuda(fn, *args).mlir_module()
  assert text.count(_TRITON_CALL) == 1
  assert "gated_delta_chunks" in text


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_mosaic_kernel_compiles_for_tpu_v5e():
  from jax.experimental import topologies

  device = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
          for x in _bf16_operands(c=128, n=4)]
  fn = jax.jit(lambda *a: gated_delta_pallas.fused_recurrence(*a, True))
  compiled = fn.trace(*args).lower(lowering_platforms=("tpu",)).compile()
  assert "gated_delta_chunks" in compiled.as_text()


def test_unsupported_sizes_are_refused_with_the_fix():
  inputs = make_inputs(0, t=8, dk=5, dv=16)
  with pytest.raises(ValueError, match=r"Dk must be a power of two >= 16.*impl='chunked'"):
    run(inputs, impl="pallas", chunk_size=16)
  with pytest.raises(ValueError, match=r"chunk_size must be a power of two >= 16"):
    run(make_inputs(0, t=8, dk=16, dv=16), impl="pallas", chunk_size=24)
  with pytest.raises(ValueError,
                     match=r"delta_impl: 'pallas': Dk must be a power of two >= 16.*head_dim"):
    ModelConfig(vocab_size=16, d_model=48, num_heads=2, delta_impl="pallas")


def test_model_loss_and_gradients_equal_the_chunked_op():
  """A sleep model whose fast-weight blocks run the kernel: Algorithm 1's loss and its
  gradients equal those of the same model with the pure-JAX chunked op."""
  import sleep_jax as sj

  window, windows = 16, 3
  rng = np.random.default_rng(7)
  tokens = jnp.asarray(rng.integers(0, 32, (2, window * windows)), jnp.int32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": jnp.ones(tokens.shape, bool)}
  results = {}
  for impl in ("pallas", "chunked"):
    cfg = ModelConfig(vocab_size=32, d_model=32, num_heads=2, layout="ag", window=window,
                      chunk_size=16, delta_impl=impl, dtype="float32")
    params = sj.init(cfg, jax.random.PRNGKey(0))
    fn = jax.jit(jax.value_and_grad(
        lambda p: sj.loss(p, batch, 2, consolidation_windows=(True, True, False))[0]))
    results[impl] = fn(params)
  (l_kernel, g_kernel), (l_pure, g_pure) = results["pallas"], results["chunked"]
  assert float(l_pure) > 1.0  # the last window is scored, after two slept windows
  np.testing.assert_allclose(l_kernel, l_pure, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_kernel.weights), jax.tree.leaves(g_pure.weights)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))) + 1e-9)


# ----------------------------------------------------------------------------- triangular solve

SOLVES = {"gpu": gated_delta_pallas._call_solve_gpu, "tpu": gated_delta_pallas._call_solve_tpu}


def _delta_rule_matrices(rng, g, c, dk, aligned=False):
  """Strictly lower A[c, s] = beta_c exp(sum_{s<i<=c} log_alpha_i) (k_c . k_s), float64, as
  the chunked delta rule builds it: unit keys, beta in (0.02, 0.98) and decays with exact
  zeros and -30; or (``aligned``) keys around one shared direction, beta in (0.9, 0.98) and
  no decay, which makes I + A ill-conditioned."""
  if aligned:
    keys = rng.standard_normal((g, 1, dk)) + 0.3 * rng.standard_normal((g, c, dk))
    beta = rng.uniform(0.9, 0.98, (g, c))
    log_alpha = np.zeros((g, c))
  else:
    keys = rng.standard_normal((g, c, dk))
    beta = rng.uniform(0.02, 0.98, (g, c))
    log_alpha = rng.uniform(-2.0, 0.0, (g, c))
    special = rng.uniform(size=(g, c))
    log_alpha[special < 0.15] = 0.0
    log_alpha[special > 0.9] = -30.0
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  csum = np.cumsum(log_alpha, axis=-1)
  decay = np.exp(np.minimum(csum[:, :, None] - csum[:, None, :], 0.0))
  return np.tril(beta[:, :, None] * decay * (keys @ np.swapaxes(keys, 1, 2)), -1)


def _solve_problems(seed, c=64, widths=(32, 16)):
  """Two matrices of each kind: random (normal entries / sqrt(c)), the delta rule's, and
  its ill-conditioned case. Diagonals and upper triangles hold junk the solve must ignore."""
  rng = np.random.default_rng(seed)
  lower = np.concatenate([np.tril(rng.standard_normal((2, c, c)) / np.sqrt(c), -1),
                          _delta_rule_matrices(rng, 2, c, 16),
                          _delta_rule_matrices(rng, 2, c, 16, aligned=True)])
  junk = np.triu(rng.standard_normal(lower.shape) * 5.0)
  rhs = [rng.standard_normal((lower.shape[0], c, r)) for r in widths]
  return lower, lower + junk, rhs


def _assert_solved(x, matrices, rhs):
  """x == matrices^{-1} rhs to 2e-6 of the largest |entry| per matrix (a few float32 ulps)."""
  expected = np.linalg.solve(matrices, rhs)
  error = np.max(np.abs(np.asarray(x, np.float64) - expected), axis=(1, 2))
  bound = 2e-6 * np.max(np.abs(expected), axis=(1, 2))
  assert np.all(error <= bound), (error, bound)


@pytest.mark.parametrize("call", sorted(SOLVES))
def test_both_solve_kernels_match_float64_solve(call):
  """(I + A)^{-1} rhs and (I + A)^{-T} rhs by the Triton-shaped and the Mosaic-shaped kernel
  (interpreter) against LAPACK in float64, two right-hand sides at once. The ill-conditioned
  matrices need true substitution: the nilpotent-product inverse is ~1e-4 off there."""
  lower, a, rhs = _solve_problems(8)
  kernel = SOLVES[call]

  @jax.jit
  def both(a, *rhs):
    return (kernel(a, *rhs, transpose=False, interpret=True),
            kernel(a, *rhs, transpose=True, interpret=True))

  forward, transposed = both(jnp.asarray(a, jnp.float32),
                             *(jnp.asarray(r, jnp.float32) for r in rhs))
  unit = np.eye(a.shape[-1]) + lower
  for x, r in zip(forward, rhs):
    _assert_solved(x, unit, r)
  for x, r in zip(transposed, rhs):
    _assert_solved(x, np.swapaxes(unit, 1, 2), r)


def test_solve_gradients_match_autodiff_and_float64():
  """jax.grad through the kernel's custom VJP (transposed solve in the kernel, then
  dA = -tril(d rhs X^T, -1)) against jax.grad of unit_lower_inverse(a) @ rhs on the
  well-conditioned matrices, and against float64 NumPy on all (the explicit inverse is itself
  ~1e-4 off on the ill-conditioned ones). The junk in the diagonal and upper triangle gets zero
  gradient."""
  from sleep_jax.ops.gated_delta_chunked import unit_lower_inverse

  lower, a, rhs = _solve_problems(9, c=32)
  rng = np.random.default_rng(10)
  cotangents = [rng.standard_normal(r.shape) for r in rhs]

  def kernel(a, v, k):
    x = gated_delta_pallas.solve_unit_lower(a, (v, k))
    return sum(jnp.sum(xi * ci) for xi, ci in zip(x, cotangents))

  def explicit(a, v, k):
    inverse = unit_lower_inverse(a)
    return sum(jnp.sum(jnp.matmul(inverse, r, precision="highest") * ci)
               for r, ci in zip((v, k), cotangents))

  args = [jnp.asarray(x, jnp.float32) for x in [a] + rhs]
  grads = [[np.asarray(g, np.float64) for g in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)]
           for f in (kernel, explicit)]
  # float64: d rhs = (I + A)^{-T} g, dA = -tril(sum over right-hand sides of d rhs X^T, -1).
  unit = np.eye(a.shape[-1]) + lower
  d_rhs = [np.linalg.solve(np.swapaxes(unit, 1, 2), c) for c in cotangents]
  d_a = -np.tril(sum(d @ np.swapaxes(np.linalg.solve(unit, r), 1, 2)
                     for d, r in zip(d_rhs, rhs)), -1)
  well_conditioned = slice(0, 4)
  for g_kernel, g_pure, g_exact in zip(*grads, [d_a] + d_rhs):
    for expected, index in ((g_exact, slice(None)), (g_pure, well_conditioned)):
      error = np.max(np.abs(g_kernel[index] - expected[index]), axis=(1, 2))
      assert np.all(error <= 1e-6 * np.max(np.abs(g_exact[index]), axis=(1, 2))), error
  assert not np.any(np.triu(grads[0][0]))


@pytest.mark.parametrize("aligned_keys", [False, True])
def test_pallas_op_with_multi_block_chunks_matches_float64_reference(aligned_keys):
  """chunk_size 64: the solve runs four 16-row blocks per chunk inside the whole op. With keys
  around one direction, beta near 1 and no decay the chunks' systems are ill-conditioned; the
  substitution keeps float32 accuracy there (the explicit inverse of impl='chunked' is ~2e-4
  off)."""
  q, k, v, beta, log_alpha, state = make_inputs(11, t=100, dk=16, dv=32)
  if aligned_keys:
    rng = np.random.default_rng(13)
    keys = rng.standard_normal((2, 1, 3, 16)) + 0.3 * rng.standard_normal((2, 100, 3, 16))
    k = jnp.asarray(keys / np.linalg.norm(keys, axis=-1, keepdims=True), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.9, 0.98, beta.shape), jnp.float32)
    log_alpha = jnp.zeros_like(log_alpha)
  inputs = (q, k, v, beta, log_alpha, state)
  o, final_state = run(inputs, scale=0.8, impl="pallas", rule="gated_delta", chunk_size=64)
  o_ref, s_ref = reference(*inputs, 0.8, "gated_delta")
  assert_close(o, o_ref, 1e-5)
  assert_close(final_state, s_ref, 1e-5)


def test_solve_rejects_bad_shapes():
  a = jnp.zeros((2, 16, 16))
  with pytest.raises(ValueError, match=r"a must have shape \[g, c, c\]"):
    gated_delta_pallas.solve_unit_lower(jnp.zeros((2, 16, 8)), jnp.zeros((2, 16, 16)))
  with pytest.raises(ValueError, match=r"c must be a power of two >= 16, got 24"):
    gated_delta_pallas.solve_unit_lower(jnp.zeros((2, 24, 24)), jnp.zeros((2, 24, 16)))
  with pytest.raises(ValueError, match=r"rhs must have shape \[g=2, c=16, r\].*got \(2, 16, 48\)"):
    gated_delta_pallas.solve_unit_lower(a, (jnp.zeros((2, 16, 16)), jnp.zeros((2, 16, 48))))


def _op_operands(b=1, t=128, h=2, d=128):
  rng = np.random.default_rng(12)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16) for _ in range(3))
  beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, h)), jnp.float32)
  log_alpha = jnp.asarray(rng.uniform(-1.0, 0.0, (b, t, h)), jnp.float32)
  return q, k, v, beta, log_alpha, jnp.zeros((b, h, d, d), jnp.float32)


def _pallas_op(chunk_size):
  def loss(q, k, v, beta, log_alpha, state):
    o, s = ops.gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, impl="pallas",
                                chunk_size=chunk_size)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
  return loss


def test_cuda_lowering_of_the_op_emits_two_triton_kernels():
  """The delta rule with impl='pallas' at the benchmark's block sizes (chunk 64, Dk = Dv = 128,
  bf16) lowers to two Triton kernels: the triangular solve and the chunk recurrence. With its
  gradient, a third: the transposed solve of the backward pass."""
  args = _op_operands()
  loss = _pallas_op(64)
  text = _export_for_cuda(jax.jit(loss), *args).mlir_module()
  assert text.count(_TRITON_CALL) == 2
  assert "unit_lower_solve" in text and "gated_delta_chunks" in text
  with_grad = _export_for_cuda(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), *args)
  assert with_grad.mlir_module().count(_TRITON_CALL) == 3


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_mosaic_solve_compiles_for_tpu_v5e():
  """The solve kernel and its transposed form (via the gradient) at chunk 64 and 128, and the
  whole op at chunk 128, compile for a v5e."""
  from jax.experimental import topologies

  device = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def abstract(*xs):
    return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in xs]

  for c in (64, 128):
    a, v, k = (jax.ShapeDtypeStruct((16, c, width), jnp.float32) for width in (c, 128, 128))
    fn = jax.jit(jax.value_and_grad(
        lambda a, v, k: sum(jnp.sum(x) for x in gated_delta_pallas.solve_unit_lower(a, (v, k))),
        argnums=(0, 1, 2)))
    compiled = fn.trace(*abstract(a, v, k)).lower(lowering_platforms=("tpu",)).compile()
    assert "unit_lower_solve" in compiled.as_text()
  fn = jax.jit(_pallas_op(128))
  compiled = fn.trace(*abstract(*_op_operands(t=256))).lower(
      lowering_platforms=("tpu",)).compile()
  text = compiled.as_text()
  assert "unit_lower_solve" in text and "gated_delta_chunks" in text
