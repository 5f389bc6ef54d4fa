"""The inter-chunk recurrence of the chunked delta rule, forwards and backwards.

Both the pure-JAX chunked form and the backward pass of the Pallas kernel run these loops.
Per chunk ``n`` (``S_n`` the state at the chunk start):

    u_n = u0_n - w_n S_n          (corrected values; the Hebbian rule has no w: u_n = u0_n)
    S_{n+1} = gamma_n S_n + k_end_n^T u_n

Shape legend: ``n`` chunks (leading, the loop axis), ``...`` batch axes, ``c`` token in a
chunk, ``k`` key size, ``v`` value size. Every product in the loops is float32 at HIGHEST
precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _product(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum(spec, x, y, precision=_HIGHEST)


def matmul(spec: str, x: jax.Array, y: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """einsum with float32 results: true float32 for float32 operands (no TF32/bf16
  passes on accelerators), or half-precision operands with float32 accumulation."""
  if dtype == jnp.float32:
    return _product(spec, x.astype(jnp.float32), y.astype(jnp.float32))
  return jnp.einsum(spec, x.astype(dtype), y.astype(dtype),
                    preferred_element_type=jnp.float32)


def forward(u0, w, k_end, gamma, initial_state, unroll: int | bool = 1):
  """Runs the recurrence.

  Args:
    u0: ``[n ... c v]``; w: ``[n ... c k]`` or None (Hebbian); k_end: ``[n ... c k]``;
    gamma: ``[n ...]``; initial_state: ``[... k v]``. All float32.
    unroll: chunks per iteration of the loop (``lax.scan``'s ``unroll``; True: no loop).

  Returns:
    ``(final_state [... k v], start_states [n ... k v], u [n ... c v])``.
  """
  # k_end enters transposed ([k c]), so the update contracts the last axis of both operands:
  # XLA:CPU runs a product that contracts the leading axis of its left operand several
  # times slower, and the transpose outside the loop is one cheap copy.
  def step(state, xs):
    u0_n, w_n, k_end_t_n, gamma_n = xs
    u_n = u0_n if w_n is None else u0_n - _product("...ck,...kv->...cv", w_n, state)
    new_state = (gamma_n[..., None, None] * state
                 + _product("...kc,...cv->...kv", k_end_t_n, u_n))
    return new_state, (state, u_n)

  final_state, (start_states, u) = jax.lax.scan(
      step, initial_state, (u0, w, jnp.swapaxes(k_end, -1, -2), gamma), unroll=unroll)
  return final_state, start_states, u


def backward(d_u, d_states, k_end, w, gamma, d_final, unroll: int | bool = 1):
  """Runs the recurrence backwards, carrying the cotangent of ``S_{n+1}``.

  Args:
    d_u: ``[n ... c v]``, cotangent of ``u`` from everything outside the recurrence.
    d_states: ``[n ... k v]``, cotangent of the start states ``S_n`` from outside.
    k_end, w, gamma: as in ``forward``.
    d_final: ``[... k v]``, cotangent of the final state.
    unroll: as in ``forward``.

  Returns:
    ``(d_initial [... k v], d_u [n ... c v] total, d_next [n ... k v])``: the initial
    state's cotangent, ``u``'s whole cotangent (which is also ``u0``'s), and the cotangent of
    each chunk's end state ``S_{n+1}``, from which the caller gets those of ``k_end``
    (``u d_next^T``), ``gamma`` (``<S_n, d_next>``) and ``w`` (``-d_u S_n^T``).
  """
  def step(d_next, xs):
    d_u_n, d_state_n, k_end_n, w_t_n, gamma_n = xs
    d_u_n = d_u_n + _product("...ck,...kv->...cv", k_end_n, d_next)
    d_state = gamma_n[..., None, None] * d_next + d_state_n
    if w_t_n is not None:
      d_state = d_state - _product("...kc,...cv->...kv", w_t_n, d_u_n)
    return d_state, (d_u_n, d_next)

  w_t = None if w is None else jnp.swapaxes(w, -1, -2)
  d_initial, (d_u, d_next) = jax.lax.scan(
      step, d_final, (d_u, d_states, k_end, w_t, gamma), reverse=True, unroll=unroll)
  return d_initial, d_u, d_next
