"""Chunkwise-parallel form of the gated delta rule and of the Hebbian rule.

The sequence is cut into chunks of ``C`` tokens. Inside a chunk, the delta rule's
token-by-token corrections become one unit-lower-triangular system (the WY/UT form), solved
in float32 for all chunks at once; a ``lax.scan`` over chunks then carries the ``[Dk, Dv]``
state with two small matrix products per chunk, and the outputs of all chunks come from
batched matrix products once the chunk-start states are known. docs/delta_rule.md derives
it. Decays are handled in log space (float32), with masks applied before ``exp``.

Shape legend: ``n`` chunks, ``b`` batch, ``h`` heads, ``c``/``s`` token in a chunk,
``k`` key size Dk, ``v`` value size Dv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sleep_jax.ops import chunk_states, gated_delta_pallas

_HIGHEST = jax.lax.Precision.HIGHEST


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
  """Dtype of the matmul operands: float32 for float32 (or wider) inputs, else the
  inputs' half-precision dtype (the products then accumulate in float32)."""
  dtype = jnp.result_type(*xs)
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(dtype)


_matmul = chunk_states.matmul


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
  """[b t h ...] (t = num_chunks * chunk) -> [n b h c ...]."""
  b, _, h = x.shape[:3]
  x = x.reshape((b, num_chunks, chunk, h) + x.shape[3:])
  return jnp.moveaxis(x, (1, 3), (0, 2))


def _from_chunks(x: jax.Array) -> jax.Array:
  """[n b h c ...] -> [b (n c) h ...]."""
  n, b, h, c = x.shape[:4]
  x = jnp.moveaxis(x, (0, 2), (1, 3))
  return x.reshape((b, n * c, h) + x.shape[4:])


def _strictly_lower(chunk: int) -> jax.Array:
  """[c, s] boolean mask of s < c."""
  idx = jnp.arange(chunk)
  return idx[:, None] > idx[None, :]


def _segment_log_decays(log_alpha: jax.Array):
  """Log-decays inside each chunk, all float32 and <= 0.

  Args:
    log_alpha: ``[n b h c]``.

  Returns:
    from_start: ``[n b h c]``, sum of log_alpha over tokens ``0..c`` of the chunk.
    pairwise: ``[n b h c s]``, sum over tokens ``s+1..c`` for ``c >= s`` and ``-inf``
      above the diagonal (so ``exp`` gives the causal decay matrix, exactly 0 above).
    to_end: ``[n b h s]``, sum over tokens ``s+1..C-1`` (decay from token s to the chunk
      end).
  """
  chunk = log_alpha.shape[-1]
  from_start = jnp.cumsum(log_alpha, axis=-1)
  idx = jnp.arange(chunk)
  # pairwise[c, s] is summed directly over its own tokens rather than taken as
  # from_start[c] - from_start[s]: the difference of two large cumulative sums would
  # lose relative accuracy when a chunk decays strongly.
  # Token i (rows) lies strictly after s (columns).
  terms = jnp.where(_strictly_lower(chunk), log_alpha[..., :, None], 0.0)
  # A log-depth tree of adds: on CPU several times faster than cumsum's reduce-window.
  sums = jax.lax.associative_scan(jnp.add, terms, axis=-2)
  to_end = sums[..., -1, :]
  causal = idx[:, None] >= idx[None, :]
  # Mask before exp: above the diagonal the sums are meaningless and exp of -inf is 0.
  pairwise = jnp.where(causal, sums, -jnp.inf)
  return from_start, pairwise, to_end


def _matmul_f32(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.matmul(x, y, precision=_HIGHEST)


def _transposed(x: jax.Array) -> jax.Array:
  """``x`` with its last two axes swapped, written out as an array of its own on CPU.

  XLA folds a transpose into the product that consumes it; a product then contracting the
  second-to-last axis of its left operand misses XLA:CPU's fused small-matrix kernels and ran
  2.5-4.5x slower than the products of the same size that use them (D = 16). The barrier
  keeps the copy. Other platforms multiply transposed operands natively and get the plain
  transpose.
  """
  x_t = jnp.swapaxes(x, -1, -2)
  return jax.lax.platform_dependent(x_t, cpu=jax.lax.optimization_barrier,
                                    default=lambda t: t)


def _diagonal_blocks(x: jax.Array, size: int) -> jax.Array:
  """[n, m, m] -> [n * (m // size), size, size]: the diagonal blocks of each matrix,
  taken by static slices (plain for every compiler) and kept in one batch axis."""
  m = x.shape[-1]
  blocks = [x[:, i:i + size, i:i + size] for i in range(0, m, size)]
  return jnp.stack(blocks, axis=1).reshape((-1, size, size))


# Diagonal blocks up to this size are inverted with the nilpotent product formula; larger
# ones by block doubling. Both are batched matrix products in true float32.
_BASE_BLOCK = 16


@jax.custom_jvp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """``(I + a)^{-1}`` for a strictly lower-triangular float32 ``a`` of shape ``[..., m, m]``.

  The upper triangle and diagonal of ``a`` are ignored. Diagonal blocks of up to 16 rows
  use ``(I - N)^{-1} = (I + N)(I + N^2)(I + N^4)(I + N^8)`` with ``N = -a`` nilpotent;
  neighbouring inverted blocks then merge by
  ``[[P, 0], [Q, R]]^{-1} = [[P^-1, 0], [-R^-1 Q P^-1, R^-1]]`` until one block remains.
  Every product runs at HIGHEST precision: with TF32/bf16 passes an explicit inverse
  loses accuracy on accelerators.
  """
  batch_shape, m = a.shape[:-2], a.shape[-1]
  # One batch axis keeps every product a plain batched matmul.
  a = jnp.tril(a, -1).reshape((-1, m, m))
  base = min(_BASE_BLOCK, 1 << max(m - 1, 0).bit_length())
  size = base
  while size < m:
    size *= 2
  if size != m:
    # Zero padding extends I + a by an identity block, whose inverse is the identity.
    a = jnp.pad(a, [(0, 0), (0, size - m), (0, size - m)])
  num = a.shape[0]

  nilpotent = -_diagonal_blocks(a, base)
  blocks = jnp.eye(base, dtype=a.dtype) + nilpotent
  power, covered = nilpotent, 2
  while covered < base:
    power = _matmul_f32(power, power)
    blocks = blocks + _matmul_f32(blocks, power)
    covered *= 2

  width = base
  while width < size:
    # blocks: [num * pairs * 2, width, width], the inverted diagonal blocks in order.
    lower_left = _diagonal_blocks(a, 2 * width)[:, width:, :width]
    halves = blocks.reshape((-1, 2, width, width))
    top_inv, bottom_inv = halves[:, 0], halves[:, 1]
    merged = -_matmul_f32(_matmul_f32(bottom_inv, lower_left), top_inv)
    blocks = jnp.concatenate(
        [jnp.concatenate([top_inv, jnp.zeros_like(merged)], axis=-1),
         jnp.concatenate([merged, bottom_inv], axis=-1)], axis=-2)
    width *= 2
  return blocks.reshape((num, size, size))[:, :m, :m].reshape(batch_shape + (m, m))


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
  # d (I + a)^{-1} = -(I + a)^{-1} da (I + a)^{-1}: two products instead of
  # differentiating through the block construction.
  (a,), (da,) = primals, tangents
  inverse = unit_lower_inverse(a)
  return inverse, -_matmul_f32(_matmul_f32(inverse, jnp.tril(da, -1)), inverse)


def chunked_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    initial_state: jax.Array,
    *,
    scale: float | jax.Array,
    chunk_size: int,
    rule: str,
    kernel: bool = False,
    unroll: int | bool = 1,
) -> tuple[jax.Array, jax.Array]:
  """Chunkwise-parallel recurrence (inputs already validated).

  Args:
    q, k: ``[b t h k]``; v: ``[b t h v]``; beta, log_alpha: ``[b t h]``.
    initial_state: ``[b h k v]`` float32.
    scale: readout scale.
    chunk_size: chunk length; without ``kernel``, sequences shorter than it use their own
      length.
    rule: ``"gated_delta"`` or ``"hebbian"``.
    kernel: solve the triangular systems, and run the inter-chunk recurrence and the
      outputs, in the Pallas kernels of ``gated_delta_pallas`` (chunk_size, Dk and Dv powers
      of two >= 16; a short sequence is padded to one whole chunk) instead of an explicit
      inverse, a ``lax.scan`` and batched products.
    unroll: chunks per iteration of the pure-JAX chunk loops, forwards and backwards
      (``lax.scan``'s ``unroll``; True: no loop). Not used with ``kernel``.

  Returns:
    ``(o [b t h v] float32, final_state [b h k v] float32)``.
  """
  seq_len = v.shape[1]
  chunk = chunk_size if kernel else min(chunk_size, seq_len)
  num_chunks = -(-seq_len // chunk)
  pad = num_chunks * chunk - seq_len
  if pad:
    # Padding tokens leave the state unchanged: k = 0 and beta = 0 write nothing, and
    # log_alpha = 0 does not decay; their outputs are sliced away below.
    def pad_time(x):
      return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, beta, log_alpha = map(pad_time, (q, k, v, beta, log_alpha))

  dtype = _compute_dtype(q, k, v)
  q, k, v = (_to_chunks(x.astype(dtype), num_chunks, chunk) for x in (q, k, v))
  beta, log_alpha = (_to_chunks(x.astype(jnp.float32), num_chunks, chunk)
                     for x in (beta, log_alpha))
  from_start, pairwise, to_end = _segment_log_decays(log_alpha)
  decay = jnp.exp(pairwise)                                 # [n b h c s], 0 above diag
  g = jnp.exp(from_start)                                   # [n b h c]
  e = jnp.exp(to_end)                                       # [n b h s]
  gamma = g[..., -1]                                        # [n b h], the whole chunk

  if kernel:
    return _kernel_path(q, k, v, beta, decay, g, e, gamma, initial_state, scale, dtype,
                        seq_len, rule)
  o, final_state = _chunk_core(rule, dtype, unroll, q, k, v, beta, decay, g, e, gamma,
                               initial_state)
  return (scale * _from_chunks(o))[:, :seq_len], final_state


def _system_matrix(k, beta, decay, dtype):
  """``K K^T`` and ``A[c, s] = beta_c decay[c, s] (k_c . k_s)`` for ``s < c`` (0 elsewhere):
  the corrected values u solve ``(I + A) u = beta v - beta g k S_0`` within a chunk."""
  gram = _matmul("nbhck,nbhsk->nbhcs", k, k, dtype)
  return gram, jnp.where(_strictly_lower(k.shape[-2]), beta[..., None] * decay * gram, 0.0)


# ----------------------------------------------------------------------------- core
# The chunked recurrence with a hand-written backward pass. Its inputs are already in
# chunks, with the decays exponentiated: ``decay [n b h c s]`` (zero above the diagonal),
# ``g [n b h c]`` (decay from the chunk start to token c, inclusive), ``e [n b h s]`` (from
# token s to the chunk end) and ``gamma [n b h]`` (whole chunk). Autodiff carries the
# gradients of these back to log_alpha. The backward pass:
#   - never differentiates through the triangular inverse: for sol = T r with
#     T = (I + A)^{-1}, dr = T^T dsol and dA = -dr sol^T (strictly lower part);
#   - runs the inter-chunk recurrence backwards with two products per chunk, carrying the
#     state's cotangent, and does every other product for all chunks at once;
#   - keeps the chunk-start states from the forward pass instead of recomputing them;
#   - recomputes k q^T rather than keeping q k^T (one product for a [c, s] residual).
# docs/delta_rule.md "Gradients and memory" has the equations. Forward-mode differentiation
# (jax.jvp) is not defined for a custom VJP: impl="scan" supports it.


def _core_forward(rule, dtype, unroll, q, k, v, beta, decay, g, e, gamma, initial_state):
  f32 = jnp.float32
  qk = _matmul("nbhck,nbhsk->nbhcs", q, k, dtype)
  scores = qk * decay
  k_to_end = e[..., None] * k.astype(f32)
  if rule == "gated_delta":
    # Writing u = u0 - w S_0, u0 and w come from one triangular inverse per chunk.
    gram, a = _system_matrix(k, beta, decay, dtype)
    # Two products rather than one on concatenated right-hand sides: no [c, Dk + Dv]
    # buffers to concatenate and split, forwards and backwards.
    inverse = unit_lower_inverse(a)
    u0 = _matmul_f32(inverse, beta[..., None] * v.astype(f32))
    w = _matmul_f32(inverse, (beta * g)[..., None] * k.astype(f32))
  else:
    # Hebbian: nothing is corrected, u = beta v does not depend on the state.
    gram = inverse = w = None
    u0 = beta[..., None] * v.astype(f32)

  final_state, start_states, u = chunk_states.forward(u0, w, k_to_end, gamma, initial_state,
                                                      unroll)
  inter = _matmul("nbhck,nbhkv->nbhcv", q, start_states, dtype)
  intra = _matmul("nbhcs,nbhsv->nbhcv", scores, u, dtype)
  o = g[..., None] * inter + intra
  residuals = (q, k, v, beta, decay, g, e, gamma, gram, inverse, u0, w, u, start_states)
  return (o, final_state), residuals


def _core_backward(rule, dtype, unroll, residuals, cotangents):
  f32 = jnp.float32
  q, k, v, beta, decay, g, e, gamma, gram, inverse, u0, w, u, start_states = residuals
  d_o, d_final = cotangents
  d_o = d_o.astype(f32)
  qf, kf, vf = (x.astype(f32) for x in (q, k, v))

  # o = g * (q S_n) + scores u, scores = qk * decay. Where a product needs a [c, s]
  # matrix transposed, the transpose comes from its own product (k q^T, u d_o^T): XLA folds
  # a plain transpose into the consuming product, and a product that contracts the leading
  # axis of its left operand runs several times slower on CPU.
  decay_t = jnp.swapaxes(decay, -1, -2)
  kq = _matmul("nbhsk,nbhck->nbhsc", k, q, dtype)
  d_u = _matmul("nbhsc,nbhcv->nbhsv", kq * decay_t, d_o, dtype)
  d_scores = _matmul("nbhcv,nbhsv->nbhcs", d_o, u, dtype)
  d_scores_t = _matmul("nbhsv,nbhcv->nbhsc", u, d_o, dtype)
  d_inter = _matmul("nbhcv,nbhkv->nbhck", d_o, start_states, dtype)
  d_q = g[..., None] * d_inter
  d_g = jnp.sum(qf * d_inter, axis=-1)
  d_states_out = _matmul("nbhkc,nbhcv->nbhkv", _transposed(g[..., None] * qf), d_o, dtype)
  k_to_end = e[..., None] * kf

  d_initial, d_u, d_next_states = chunk_states.backward(d_u, d_states_out, k_to_end, w,
                                                        gamma, d_final, unroll)
  d_gamma = jnp.sum(start_states * d_next_states, axis=(-2, -1))
  d_k_to_end = _matmul_f32(u, jnp.swapaxes(d_next_states, -1, -2))
  d_k = e[..., None] * d_k_to_end
  d_e = jnp.sum(kf * d_k_to_end, axis=-1)

  if rule == "gated_delta":
    # u = u0 - w S_n; u0 = T beta v and w = T beta g k with T = (I + A)^{-1}.
    d_w = -_matmul_f32(d_u, jnp.swapaxes(start_states, -1, -2))
    inverse_t = _transposed(inverse)
    d_rhs_v = _matmul_f32(inverse_t, d_u)
    d_rhs_k = _matmul_f32(inverse_t, d_w)
    d_a = -(_matmul_f32(d_rhs_v, jnp.swapaxes(u0, -1, -2))
            + _matmul_f32(d_rhs_k, jnp.swapaxes(w, -1, -2)))
    d_a = jnp.where(_strictly_lower(q.shape[-2]), d_a, 0.0)
    d_v = beta[..., None] * d_rhs_v
    d_bg = jnp.sum(d_rhs_k * kf, axis=-1)             # cotangent of beta * g
    d_k = d_k + (beta * g)[..., None] * d_rhs_k
    d_g = d_g + beta * d_bg
    # A = beta_c decay[c, s] gram[c, s], strictly lower.
    d_gram = d_a * beta[..., None] * decay
    d_decay = d_a * beta[..., None] * gram
    d_beta = (jnp.sum(d_rhs_v * vf, axis=-1) + g * d_bg
              + jnp.sum(d_a * decay * gram, axis=-1))
    d_k = d_k + _matmul("nbhcs,nbhsk->nbhck", d_gram + jnp.swapaxes(d_gram, -1, -2), k,
                        dtype)
  else:
    d_v = beta[..., None] * d_u
    d_beta = jnp.sum(d_u * vf, axis=-1)
    d_decay = 0.0

  # scores = qk * decay.
  d_decay = d_decay + d_scores * jnp.swapaxes(kq, -1, -2)
  d_q = d_q + _matmul("nbhcs,nbhsk->nbhck", d_scores * decay, k, dtype)
  d_k = d_k + _matmul("nbhsc,nbhck->nbhsk", d_scores_t * decay_t, q, dtype)
  return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_beta, d_decay,
          d_g, d_e, d_gamma, d_initial)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunk_core(rule, dtype, unroll, q, k, v, beta, decay, g, e, gamma, initial_state):
  """Unscaled outputs ``[n b h c v]`` float32 and the final state of the chunked
  recurrence; inputs ``[n b h c ...]`` (q, k, v in ``dtype``)."""
  return _core_forward(rule, dtype, unroll, q, k, v, beta, decay, g, e, gamma,
                       initial_state)[0]


_chunk_core.defvjp(_core_forward, _core_backward)


def _kernel_path(q, k, v, beta, decay, g, e, gamma, initial_state, scale, dtype, seq_len,
                 rule):
  """The Pallas route: triangular solve and fused recurrence in kernels."""
  # Keys decayed to the chunk end: what each token contributes to the next chunk's state.
  k_to_end = e[..., None] * k.astype(jnp.float32)
  scores = _matmul("nbhck,nbhsk->nbhcs", q, k, dtype) * decay
  if rule != "gated_delta":
    # The kernel skips w S for the Hebbian rule; k_to_end stands in for the unused w.
    u_hebbian = beta[..., None] * v.astype(jnp.float32)
    return _kernel_outputs(q, k_to_end, u_hebbian, k_to_end, scores, g, gamma,
                           initial_state, scale, dtype, seq_len, correct=False)
  _, a = _system_matrix(k, beta, decay, dtype)

  # One Pallas kernel solves for both right-hand sides by blocked forward substitution:
  # no explicit inverse, no chain of small batched products through memory.
  def flat(x):
    return x.reshape((-1,) + x.shape[-2:])
  u0, w = gated_delta_pallas.solve_unit_lower(
      flat(a), (flat(beta[..., None] * v.astype(jnp.float32)),
                flat((beta * g)[..., None] * k.astype(jnp.float32))))
  u0, w = u0.reshape(a.shape[:-1] + (v.shape[-1],)), w.reshape(k.shape)
  return _kernel_outputs(q, w, u0, k_to_end, scores, g, gamma, initial_state, scale, dtype,
                         seq_len, correct=True)


def _kernel_outputs(q, w, u0, k_to_end, scores, g, gamma, initial_state, scale, dtype,
                    seq_len, *, correct):
  """Outputs and final state from the Pallas kernel; chunked inputs ``[n b h c ...]``."""
  n, b, h, c, dk = q.shape
  dv = u0.shape[-1]

  def rows(x, dtype=None):
    # [n b h c ...] -> [(b h) n c ...]: one kernel row per batch entry and head.
    x = x if dtype is None else x.astype(dtype)
    return jnp.moveaxis(x, 0, 2).reshape((b * h, n) + x.shape[3:])

  # The readout scale and the decay from the chunk start go into the operands.
  qg = (scale * g)[..., None] * q.astype(jnp.float32)
  o, final_state = gated_delta_pallas.fused_recurrence(
      rows(qg, dtype), rows(w, dtype), rows(u0, jnp.float32), rows(k_to_end, dtype),
      rows(scale * scores, dtype), rows(gamma),
      initial_state.reshape(b * h, dk, dv), correct)
  o = jnp.moveaxis(o.reshape(b, h, n * c, dv), 1, 2)
  return o[:, :seq_len], final_state.reshape(b, h, dk, dv)
