"""Pallas kernels of the chunked delta rule: the inter-chunk recurrence fused with the outputs,
and the per-chunk unit-lower-triangular solve.

The pure-JAX chunked form (``gated_delta_chunked.py``) carries the ``[Dk, Dv]`` state through a
``lax.scan`` over chunks: on a GPU every chunk is a handful of tiny kernel launches, and the
chunk-start states of all chunks are written to memory so that the outputs can be formed by
batched products afterwards. This kernel keeps the state on chip instead. One program owns one
(batch x head, block of Dv columns) pair and walks the chunks in order; per chunk ``n``::

    u_n   = u0_n - w_n S_n                   (corrected values; u_n = u0_n for Hebbian)
    o_n   = qg_n S_n + P_n u_n               (qg_n: queries decayed from the chunk start,
                                              P_n: decayed causal scores q k^T; both carry
                                              the readout scale)
    S_n+1 = a_n S_n + kend_n^T u_n           (a_n: decay over the whole chunk)

so neither the per-chunk states nor ``u`` ever reach memory. The decays and scores before it stay
in XLA, batched over all chunks.

The triangular solve (``solve_unit_lower``) gives ``u0`` and ``w`` of every chunk,
``(I + A)^{-1} [beta v, beta exp(from_start) k]``, in one kernel with one program per matrix
(per group of matrices on TPU): blocked forward substitution over 16-row blocks, the diagonal
blocks row by row, all in float32; no explicit inverse is formed.

Backends. GPU: Triton (``jax.experimental.pallas.triton``), the chunk loop inside the kernel,
grid ``(B*H, Dv / bv)``. TPU: Mosaic, the chunks as the last ("arbitrary") grid axis with the state
in a VMEM scratch. Other backends (CPU): Pallas' interpreter, which is slow and only meant for
tests. ``jax.lax.platform_dependent`` picks the kernel when the computation is lowered, so
ahead-of-time compilation for a TPU topology on a CPU host gets the Mosaic kernel.

Precision. The state is float32. Products take their operands in the compute dtype (float32 for
float32 inputs, at HIGHEST precision; bf16/f16 inputs give bf16/f16 operands, float32
accumulation): with bf16 inputs the state is rounded to bf16 as an operand of ``w S`` and
``qg S``, where the pure-JAX scan keeps it in float32. Tests bound the difference.

Gradients. The recurrence kernel has no backward kernel of its own: ``fused_recurrence`` is a
``jax.custom_vjp`` whose backward pass recomputes the chunk-start states and runs the hand-written
backward of the pure-JAX chunked form (``chunk_states.backward`` and batched products), so
gradients equal the chunked form's; ``reference`` (a ``lax.scan`` of the same function) is the
oracle the tests differentiate. The solve's backward is the transposed solve, by the same kernel
walking the blocks upwards.

Shape legend: ``g`` = B*H rows (matrices, for the solve), ``n`` chunks, ``c`` tokens per chunk,
``k`` Dk, ``v`` Dv, ``r`` columns of a right-hand side.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sleep_jax.ops import chunk_states

_HIGHEST = jax.lax.Precision.HIGHEST

# Columns of the state one GPU program owns. 64 keeps a [128, 64] float32 state in registers
# (64 per thread at 4 warps) and gives B*H*2 programs at Dv=128, enough to fill an H100/H200.
_GPU_BLOCK_V = 64


def _kernel_size(size: int) -> bool:
  """Triton's matrix products need power-of-two extents of at least 16 on every axis."""
  return size >= 16 and not size & (size - 1)


def supported(chunk: int, dk: int, dv: int) -> str | None:
  """Why the kernels cannot run these sizes, or None if they can."""
  for name, size in (("chunk_size", chunk), ("Dk", dk), ("Dv", dv)):
    if not _kernel_size(size):
      return f"{name} must be a power of two >= 16 for the Pallas kernel, got {size}"
  return None


def _dot(x: jax.Array, y: jax.Array, dtype, contract_first: bool = False) -> jax.Array:
  """x @ y (or x^T @ y) with float32 results from `dtype` operands."""
  dims = (((0,), (0,)), ((), ())) if contract_first else (((1,), (0,)), ((), ()))
  precision = _HIGHEST if dtype == jnp.float32 else None
  return jax.lax.dot_general(x.astype(dtype), y.astype(dtype), dims, precision=precision,
                             preferred_element_type=jnp.float32)


def _chunk(qg, w, u0, kend, scores, decay, state, *, dtype, correct):
  """One chunk of the recurrence for one row block. Returns (o [c bv], new state [k bv])."""
  u = u0 - _dot(w, state, dtype) if correct else u0
  o = _dot(qg, state, dtype) + _dot(scores, u, dtype)
  new_state = decay * state + _dot(kend, u, dtype, contract_first=True)
  return o, new_state


# ----------------------------------------------------------------------------- reference


def reference(qg, w, u0, kend, scores, decay, initial_state, *, correct):
  """Pure-JAX definition of the fused function, a lax.scan over chunks.

  Args:
    qg, w, kend: ``[g n c k]``; u0: ``[g n c v]`` float32; scores: ``[g n c c]``;
    decay: ``[g n]`` float32; initial_state: ``[g k v]`` float32.

  Returns:
    ``(o [g n c v] float32, final_state [g k v] float32)``.
  """
  chunk = functools.partial(_chunk, dtype=qg.dtype, correct=correct)

  def step(state, xs):
    qg_n, w_n, u0_n, kend_n, scores_n, decay_n = xs
    o, state = jax.vmap(chunk)(qg_n, w_n, u0_n, kend_n, scores_n, decay_n[:, None, None], state)
    return state, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (qg, w, u0, kend, scores, decay))
  # Remat keeps only the carried state per chunk for the backward pass.
  final_state, o = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), initial_state, xs)
  return jnp.moveaxis(o, 0, 1), final_state


# ----------------------------------------------------------------------------- kernels


def _gpu_kernel(qg_ref, w_ref, u0_ref, kend_ref, scores_ref, decay_ref, s0_ref, o_ref, sT_ref,
                *, num_chunks, correct):
  """One (row, Dv block) program; the chunks in a loop, the state in registers."""
  dtype = qg_ref.dtype

  def body(n, state):
    o, state = _chunk(qg_ref[n], w_ref[n], u0_ref[n], kend_ref[n], scores_ref[n], decay_ref[n],
                      state, dtype=dtype, correct=correct)
    o_ref[n] = o
    return state

  sT_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...])


def _tpu_kernel(qg_ref, w_ref, u0_ref, kend_ref, scores_ref, decay_ref, s0_ref, o_ref, sT_ref,
                state_ref, *, correct):
  """One chunk of one (row, Dv block); the chunk is the innermost, sequential grid axis and the
  state lives in VMEM scratch between its steps."""
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    state_ref[...] = s0_ref[...]

  o, state = _chunk(qg_ref[...], w_ref[...], u0_ref[...], kend_ref[...], scores_ref[...],
                    decay_ref[0, n], state_ref[...], dtype=qg_ref.dtype,
                    correct=correct)
  o_ref[...] = o
  state_ref[...] = state

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    sT_ref[...] = state


def _out_shapes(qg, u0):
  g, n, c, _ = qg.shape
  dk, dv = qg.shape[-1], u0.shape[-1]
  return (jax.ShapeDtypeStruct((g, n, c, dv), jnp.float32),
          jax.ShapeDtypeStruct((g, dk, dv), jnp.float32))


def _call_gpu(qg, w, u0, kend, scores, decay, s0, *, correct, interpret=False):
  """Triton kernel, grid (rows, Dv blocks); the whole sequence of a row is one block."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top

  g, n, c, dk = qg.shape
  dv = u0.shape[-1]
  bv = min(_GPU_BLOCK_V, dv)
  seq = lambda width: pl.BlockSpec((None, n, c, width), lambda i, j: (i, 0, 0, 0))
  seq_v = pl.BlockSpec((None, n, c, bv), lambda i, j: (i, 0, 0, j))
  state = pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j))
  kernel = functools.partial(_gpu_kernel, num_chunks=n, correct=correct)
  return pl.pallas_call(
      kernel,
      out_shape=_out_shapes(qg, u0),
      grid=(g, dv // bv),
      in_specs=[seq(dk), seq(dk), seq_v, seq(dk), seq(c),
                pl.BlockSpec((None, n), lambda i, j: (i, 0)), state],
      out_specs=[seq_v, state],
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="gated_delta_chunks",
  )(qg, w, u0, kend, scores, decay, s0)


def _call_tpu(qg, w, u0, kend, scores, decay, s0, *, correct, interpret=False):
  """Mosaic kernel, grid (rows, Dv blocks, chunks); one chunk per grid step."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  g, n, c, dk = qg.shape
  dv = u0.shape[-1]
  # A full 128-lane tile of columns when Dv allows it, else all of Dv (a full-extent block).
  bv = 128 if dv % 128 == 0 else dv
  chunk = lambda width: pl.BlockSpec((None, None, c, width), lambda i, j, m: (i, m, 0, 0))
  chunk_v = pl.BlockSpec((None, None, c, bv), lambda i, j, m: (i, m, 0, j))
  state = pl.BlockSpec((None, dk, bv), lambda i, j, m: (i, 0, j))
  kernel = functools.partial(_tpu_kernel, correct=correct)
  return pl.pallas_call(
      kernel,
      out_shape=_out_shapes(qg, u0),
      grid=(g, dv // bv, n),
      in_specs=[chunk(dk), chunk(dk), chunk_v, chunk(dk), chunk(c),
                # The decays of a row as scalars in SMEM (a [1, 1] VMEM block would pad to a tile).
                pl.BlockSpec((None, 1, n), lambda i, j, m: (i, 0, 0), memory_space=pltpu.SMEM),
                state],
      out_specs=[chunk_v, state],
      scratch_shapes=[pltpu.VMEM((dk, bv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="gated_delta_chunks",
  )(qg, w, u0, kend, scores, decay[:, None], s0)


def _kernel(qg, w, u0, kend, scores, decay, s0, *, correct):
  return jax.lax.platform_dependent(
      qg, w, u0, kend, scores, decay, s0,
      cuda=functools.partial(_call_gpu, correct=correct),
      tpu=functools.partial(_call_tpu, correct=correct),
      default=functools.partial(_call_gpu, correct=correct, interpret=True))


# ----------------------------------------------------------------------------- public


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def fused_recurrence(qg, w, u0, kend, scores, decay, initial_state, correct):
  """The inter-chunk recurrence and the outputs, by the Pallas kernel of this platform.

  Args:
    qg, w, kend: ``[g n c k]`` in the compute dtype: the queries times their decay from the
      chunk start and the readout scale; the ``w`` of the WY form (what the chunk-start state
      takes from the corrected values); the keys decayed to the chunk end.
    u0: ``[g n c v]`` float32, corrected values for a zero chunk-start state.
    scores: ``[g n c c]`` compute dtype, the decayed causal scores inside each chunk, times the
      readout scale.
    decay: ``[g n]`` float32, the decay over each whole chunk.
    initial_state: ``[g k v]`` float32.
    correct: ``True`` for the delta rule, ``False`` for the Hebbian rule (``w`` unused).

  Returns:
    ``(o [g n c v] float32, final_state [g k v] float32)``, equal to ``reference``.
  """
  return _kernel(qg, w, u0, kend, scores, decay, initial_state, correct=correct)


def _fused_fwd(qg, w, u0, kend, scores, decay, initial_state, correct):
  out = _kernel(qg, w, u0, kend, scores, decay, initial_state, correct=correct)
  return out, (qg, w, u0, kend, scores, decay, initial_state)


def _fused_bwd(correct, residuals, cotangents):
  # The kernel keeps no chunk-start states, so the backward pass recomputes them (two small
  # products per chunk), then runs the recurrence backwards as the pure-JAX chunked form
  # does (chunk_states.backward) and does every other product for all chunks at once.
  qg, w, u0, kend, scores, decay, initial_state = residuals
  d_o, d_final = cotangents
  dtype, f32 = qg.dtype, jnp.float32

  def by_chunk(x):                                  # [g n ...] -> [n g ...]
    return jnp.moveaxis(x, 1, 0)

  qg_n, scores_n, decay_n = by_chunk(qg), by_chunk(scores), by_chunk(decay)
  kend_n = by_chunk(kend).astype(f32)
  w_n = by_chunk(w).astype(f32) if correct else None
  _, states, u = chunk_states.forward(by_chunk(u0), w_n, kend_n, decay_n, initial_state)
  # o = qg S_n + scores u_n.
  d_o = by_chunk(d_o).astype(f32)
  d_qg = chunk_states.matmul("ngcv,ngkv->ngck", d_o, states, dtype)
  d_scores = chunk_states.matmul("ngcv,ngsv->ngcs", d_o, u, dtype)
  d_u = chunk_states.matmul("ngcs,ngcv->ngsv", scores_n, d_o, dtype)
  d_states = chunk_states.matmul("ngck,ngcv->ngkv", qg_n, d_o, dtype)
  d_initial, d_u, d_next = chunk_states.backward(d_u, d_states, kend_n, w_n, decay_n, d_final)
  d_kend = chunk_states.matmul("ngcv,ngkv->ngck", u, d_next, f32)
  d_decay = jnp.sum(states * d_next, axis=(-2, -1))

  def back(x, like):                                 # [n g ...] -> [g n ...], like's dtype
    return jnp.moveaxis(x, 0, 1).astype(like.dtype)

  if correct:
    d_w = back(-chunk_states.matmul("ngcv,ngkv->ngck", d_u, states, f32), w)
  else:
    d_w = jnp.zeros_like(w)                          # the Hebbian rule does not read w
  return (back(d_qg, qg), d_w, back(d_u, u0), back(d_kend, kend), back(d_scores, scores),
          back(d_decay, decay), d_initial)


fused_recurrence.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- triangular solve

# Rows per block of the blocked forward substitution: the smallest extent of a Triton product.
_SOLVE_BLOCK = 16
# Matrices one TPU program solves in turn (fewer grid steps; each step has a fixed cost).
_TPU_SOLVE_GROUP = 8


def _solve_diagonal_block(diag, x, *, transpose):
  """``(I + L)^{-1} x`` (or ``(I + L)^{-T} x``) for the strictly lower part ``L`` of a
  ``[blk blk]`` block, by plain substitution, one column (transposed: one row) at a time.

  Register tensors are never sliced (Triton cannot): a column of ``L`` and a row of ``x`` are
  picked out by masked reductions over a broadcast iota.
  """
  blk, width = x.shape
  rows = jax.lax.broadcasted_iota(jnp.int32, (blk, blk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (blk, blk), 1)
  lower = jnp.where(rows > cols, diag, 0.0)
  x_rows = jax.lax.broadcasted_iota(jnp.int32, (blk, width), 0)

  def column(s):                                    # L[:, s] as [blk, 1]
    return jnp.sum(jnp.where(cols == s, lower, 0.0), axis=1, keepdims=True)

  if transpose:
    # Row t of (I + L^T) x = r reads x_t = r_t - sum_{s > t} L[s, t] x_s: from the bottom up.
    for t in range(blk - 2, -1, -1):
      correction = jnp.sum(column(t) * x, axis=0, keepdims=True)   # L[s > t, t] only
      x = x - jnp.where(x_rows == t, correction, 0.0)
  else:
    # Column s: once x_s is final, subtract its part L[:, s] x_s from the rows below.
    for s in range(blk - 1):
      x_s = jnp.sum(jnp.where(x_rows == s, x, 0.0), axis=0, keepdims=True)
      x = x - column(s) * x_s                       # L[r > s, s] only
  return x


def _solve_matrix(a_ref, rhs_refs, out_refs, *, transpose):
  """Solves one unit-lower-triangular system for several right-hand sides, block row by row.

  ``a_ref``: ``[c c]`` (its strictly lower triangle is ``A``), ``rhs_refs`` / ``out_refs``:
  ``[c r_i]``. Writes ``(I + A)^{-1} rhs`` (or ``(I + A)^{-T} rhs`` with ``transpose``).
  Blocked forward substitution over 16-row blocks: block row ``i`` first subtracts
  ``A_ij x_j`` for the solved blocks (matrix products in true float32), then solves with its
  diagonal block row by row. Blocks of ``A`` and ``rhs`` are static slices of refs, i.e.
  loads from memory; the solved blocks stay in registers.
  """
  size = a_ref.shape[-1]
  blk = min(_SOLVE_BLOCK, size)
  num_blocks = size // blk

  def block(i, j):
    return a_ref[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]

  # The transposed system is upper triangular: it is solved from the last block row up, and
  # its block (i, j) is A_ji^T.
  order = list(range(num_blocks - 1, -1, -1) if transpose else range(num_blocks))
  solved = [{} for _ in rhs_refs]
  for step, i in enumerate(order):
    diag = block(i, i)
    for part, (rhs_ref, out_ref) in enumerate(zip(rhs_refs, out_refs)):
      x = rhs_ref[i * blk:(i + 1) * blk, :]
      for j in order[:step]:
        x = x - _dot(block(j, i) if transpose else block(i, j), solved[part][j], jnp.float32,
                     contract_first=transpose)
      x = _solve_diagonal_block(diag, x, transpose=transpose)
      out_ref[i * blk:(i + 1) * blk, :] = x
      solved[part][i] = x


def _solve_gpu_kernel(a_ref, *refs, transpose):
  half = len(refs) // 2
  _solve_matrix(a_ref, refs[:half], refs[half:], transpose=transpose)


def _solve_tpu_kernel(a_ref, *refs, transpose):
  half = len(refs) // 2
  rhs_refs, out_refs = refs[:half], refs[half:]

  def body(m, carry):
    _solve_matrix(a_ref.at[m], [r.at[m] for r in rhs_refs], [o.at[m] for o in out_refs],
                  transpose=transpose)
    return carry

  jax.lax.fori_loop(0, a_ref.shape[0], body, 0)


def _call_solve_gpu(a, *rhs, transpose, interpret=False):
  """Triton kernel, one program per matrix."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top

  g, c, _ = a.shape
  matrix = lambda width: pl.BlockSpec((None, c, width), lambda i: (i, 0, 0))  # noqa: E731
  specs = [matrix(x.shape[-1]) for x in rhs]
  return pl.pallas_call(
      functools.partial(_solve_gpu_kernel, transpose=transpose),
      out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in rhs],
      grid=(g,),
      in_specs=[matrix(c)] + specs,
      out_specs=specs,
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="unit_lower_solve",
  )(a, *rhs)


def _call_solve_tpu(a, *rhs, transpose, interpret=False):
  """Mosaic kernel, a group of matrices per program (full-extent trailing block dims)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  g, c, _ = a.shape
  group = math.gcd(g, _TPU_SOLVE_GROUP)
  matrix = lambda width: pl.BlockSpec((group, c, width), lambda i: (i, 0, 0))  # noqa: E731
  specs = [matrix(x.shape[-1]) for x in rhs]
  return pl.pallas_call(
      functools.partial(_solve_tpu_kernel, transpose=transpose),
      out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in rhs],
      grid=(g // group,),
      in_specs=[matrix(c)] + specs,
      out_specs=specs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name="unit_lower_solve",
  )(a, *rhs)


def _solve(a, rhs, transpose):
  return tuple(jax.lax.platform_dependent(
      a, *rhs,
      cuda=functools.partial(_call_solve_gpu, transpose=transpose),
      tpu=functools.partial(_call_solve_tpu, transpose=transpose),
      default=functools.partial(_call_solve_gpu, transpose=transpose, interpret=True)))


@jax.custom_vjp
def _solve_parts(a, rhs):
  return _solve(a, rhs, transpose=False)


def _solve_parts_fwd(a, rhs):
  solved = _solve(a, rhs, transpose=False)
  return solved, (a, solved)


def _solve_parts_bwd(residuals, cotangents):
  # X = (I + A)^{-1} rhs  =>  d rhs = (I + A)^{-T} dX,  dA = -tril(d rhs X^T, -1): the
  # transposed solve is the same kernel walking the block rows upwards.
  a, solved = residuals
  d_rhs = _solve(a, tuple(cotangents), transpose=True)
  outer = sum(jnp.einsum("gcr,gsr->gcs", d, x, precision=_HIGHEST)
              for d, x in zip(d_rhs, solved))
  return -jnp.tril(outer, -1), d_rhs


_solve_parts.defvjp(_solve_parts_fwd, _solve_parts_bwd)


def solve_unit_lower(a: jax.Array, rhs: jax.Array | Sequence[jax.Array]):
  """``(I + tril(a, -1))^{-1} rhs`` in float32, by one Pallas kernel (per platform, as above).

  Args:
    a: ``[g c c]`` float32; its diagonal and upper triangle are ignored. ``c`` a power of two
      >= 16.
    rhs: ``[g c r]`` float32, or a sequence of such arrays (widths may differ; each ``r`` a
      power of two >= 16), all solved with the same matrices in one kernel.

  Returns:
    The solutions, float32, with ``rhs``'s structure (an array or a tuple of arrays).
    Differentiable (reverse mode): the backward pass runs the transposed solve in the same
    kernel.
  """
  single = not isinstance(rhs, (tuple, list))
  parts = (rhs,) if single else tuple(rhs)
  if a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise ValueError(f"a must have shape [g, c, c], got {a.shape}")
  g, c = a.shape[:2]
  if not _kernel_size(c):
    raise ValueError(f"a's size c must be a power of two >= 16, got {c}")
  for x in parts:
    r = x.shape[-1] if x.ndim == 3 else 0
    if x.shape[:2] != (g, c) or not _kernel_size(r):
      raise ValueError(f"rhs must have shape [g={g}, c={c}, r] with r a power of two >= 16, "
                       f"got {x.shape}")
  solved = _solve_parts(a.astype(jnp.float32), tuple(x.astype(jnp.float32) for x in parts))
  return solved[0] if single else solved
