"""The fast-weight op: gated delta rule (and the Hebbian rule) over a sequence.

Per head, with a float32 state ``S`` of shape ``[Dk, Dv]`` (row-vector convention)::

    gated_delta:  S_t = a_t S_{t-1} + k_t (x) (b_t (v_t - a_t S_{t-1}^T k_t))
    hebbian:      S_t = a_t S_{t-1} + b_t k_t (x) v_t
    readout:      o_t = scale * S_t^T q_t          (after the update)

with ``a_t = exp(log_alpha_t)`` and ``b_t = beta_t``. ``gated_delta_rule`` runs a whole
sequence (per-token ``lax.scan`` reference or the chunkwise-parallel form of
``gated_delta_chunked.py``); ``gated_delta_step`` is the one-token decode step.

Shape legend: ``b`` batch, ``t`` time, ``h`` heads, ``k`` key size Dk, ``v`` value size Dv.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sleep_jax.ops import gated_delta_chunked
from sleep_jax.ops import gated_delta_pallas

IMPLS = ("auto", "scan", "chunked", "pallas")
RULES = ("gated_delta", "hebbian")

_HIGHEST = jax.lax.Precision.HIGHEST

# What "auto" runs on each backend (measurements in docs/delta_rule.md). On CPU the
# per-token scan is the faster forward pass (1.4-3x at D = 16..128), but its backward pass
# is 6-7x slower there and keeps one state per token: "scan+chunked" is the scan when nothing
# differentiates the call and the chunked form when something does (``_scan_with_chunked_vjp``).
# On GPU (H200, B=4, H=16, D=128) the chunked form is 21.5x faster forward+backward than the
# scan and 1.23x faster than the Pallas kernels, which are 1.3x faster forward only. TPUs, like
# GPUs, need its matrix products.
_AUTO_IMPL = {"cpu": "scan+chunked", "gpu": "chunked", "tpu": "chunked"}

# Chunk length of the chunked form per backend, for callers that leave it to the library
# (``chunk_size=None``; ``ModelConfig``'s default). CPU: 32, measured faster than 64 at D = 32
# and 64, and than 16 forward+backward at D >= 64; with keys of at most SMALL_HEAD_DK = 32,
# SMALL_HEAD_CPU_CHUNK = 16, 7-30% faster forward+backward than 32 at D = 16 and 32 ("auto"
# runs the chunked form on CPU only under differentiation). GPU: 64, the size timed on the H200
# and the one flash-linear-attention uses. TPU: 64, not timed on a TPU; ahead-of-time compiles
# found 128 no better for memory at model level (the Pallas kernel alone wants 128 on TPU).
# Measurements and the TPU compiles in docs/delta_rule.md.
CHUNK_SIZES = {"cpu": 32, "gpu": 64, "tpu": 64}
SMALL_HEAD_DK = 32
SMALL_HEAD_CPU_CHUNK = 16


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _check_floating(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {x.dtype}.")


def _check_sequence_inputs(q, k, v, beta, log_alpha, initial_state) -> tuple[int, ...]:
  """Checks ranks and shapes of gated_delta_rule's inputs; returns (B, T, H, Dk, Dv)."""
  for name, x, rank, legend in (
      ("q", q, 4, "[B, T, H, Dk]"), ("k", k, 4, "[B, T, H, Dk]"),
      ("v", v, 4, "[B, T, H, Dv]"), ("beta", beta, 3, "[B, T, H]"),
      ("log_alpha", log_alpha, 3, "[B, T, H]")):
    if jnp.ndim(x) != rank:
      raise ValueError(
          f"{name} must have rank {rank} {legend}, got shape {jnp.shape(x)}.")
    _check_floating(name, x)
  b, t, h, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(
        f"k must have the shape of q [B, T, H, Dk] = {q.shape}, got {k.shape}.")
  if v.shape[:3] != (b, t, h):
    raise ValueError(
        f"v must be [B, T, H, Dv] with (B, T, H) = {(b, t, h)} as in q, got {v.shape}.")
  for name, x in (("beta", beta), ("log_alpha", log_alpha)):
    if x.shape != (b, t, h):
      raise ValueError(f"{name} must be [B, T, H] = {(b, t, h)}, got {x.shape}.")
  dv = v.shape[3]
  if t < 1 or dk < 1 or dv < 1:
    raise ValueError(f"T, Dk and Dv must be >= 1, got T={t}, Dk={dk}, Dv={dv}.")
  if initial_state is not None:
    _check_floating("initial_state", initial_state)
    if jnp.shape(initial_state) != (b, h, dk, dv):
      raise ValueError(
          f"initial_state must be [B, H, Dk, Dv] = {(b, h, dk, dv)}, "
          f"got {jnp.shape(initial_state)}.")
  return b, t, h, dk, dv


def _default_scale(scale, dk: int):
  return dk ** -0.5 if scale is None else scale


def _step_f32(q, k, v, beta, log_alpha, state, scale, rule):
  """One token of the recurrence, all in float32. q, k: [b h k]; v: [b h v]; beta,
  log_alpha: [b h]; state: [b h k v]. Returns (o [b h v] float32, new state)."""
  q, k, v, beta, log_alpha = (x.astype(jnp.float32) for x in (q, k, v, beta, log_alpha))
  alpha = jnp.exp(log_alpha)
  if rule == "gated_delta":
    # What the decayed state retrieves for k_t; the update writes the error of that.
    recalled = jnp.einsum("bhk,bhkv->bhv", k, state, precision=_HIGHEST)
    delta = beta[..., None] * (v - alpha[..., None] * recalled)
  else:
    delta = beta[..., None] * v
  new_state = alpha[..., None, None] * state + k[..., :, None] * delta[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HIGHEST)
  return o, new_state


def gated_delta_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    state: jax.Array,
    *,
    scale: float | jax.Array | None = None,
    rule: str = "gated_delta",
) -> tuple[jax.Array, jax.Array]:
  """One-token decode step of the fast-weight recurrence.

  Args:
    q, k: ``[b h k]`` query and key of the new token.
    v: ``[b h v]`` its value.
    beta, log_alpha: ``[b h]`` write strength and log-decay (``log_alpha <= 0``).
    state: ``[b h k v]`` state before the token (cast to float32).
    scale: readout scale, default ``Dk ** -0.5``.
    rule: ``"gated_delta"`` or ``"hebbian"``.

  Returns:
    ``(o [b h v] in v's dtype, new_state [b h k v] float32)``; equal to
    ``gated_delta_rule`` on a length-1 sequence.
  """
  _check_choice("rule", rule, RULES)
  for name, x, rank, legend in (
      ("q", q, 3, "[B, H, Dk]"), ("k", k, 3, "[B, H, Dk]"), ("v", v, 3, "[B, H, Dv]"),
      ("beta", beta, 2, "[B, H]"), ("log_alpha", log_alpha, 2, "[B, H]"),
      ("state", state, 4, "[B, H, Dk, Dv]")):
    if jnp.ndim(x) != rank:
      raise ValueError(f"{name} must have rank {rank} {legend}, got shape {jnp.shape(x)}.")
    _check_floating(name, x)
  b, h, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q [B, H, Dk] = {q.shape}, got {k.shape}.")
  if v.shape[:2] != (b, h):
    raise ValueError(f"v must be [B, H, Dv] with (B, H) = {(b, h)}, got {v.shape}.")
  for name, x in (("beta", beta), ("log_alpha", log_alpha)):
    if x.shape != (b, h):
      raise ValueError(f"{name} must be [B, H] = {(b, h)}, got {x.shape}.")
  if state.shape != (b, h, dk, v.shape[2]):
    raise ValueError(
        f"state must be [B, H, Dk, Dv] = {(b, h, dk, v.shape[2])}, got {state.shape}.")
  o, new_state = _step_f32(q, k, v, beta, log_alpha, state.astype(jnp.float32),
                           _default_scale(scale, dk), rule)
  return o.astype(v.dtype), new_state


def _scan_impl(q, k, v, beta, log_alpha, state, scale, rule):
  """Per-token reference: a lax.scan of the decode step over time."""

  def body(s, xs):
    o, s = _step_f32(*xs, s, scale, rule)
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_alpha))
  final_state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1), final_state


def _chunked_impl(rule, chunk_size, unroll, q, k, v, beta, log_alpha, state, scale):
  return gated_delta_chunked.chunked_delta_rule(
      q, k, v, beta, log_alpha, state, scale=scale, chunk_size=chunk_size, rule=rule,
      unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan_with_chunked_vjp(rule, chunk_size, unroll, q, k, v, beta, log_alpha, state, scale):
  """The scan's outputs; under reverse-mode differentiation the chunked form's outputs and
  its backward pass. JAX evaluates this primal whenever no input carries a tangent (wake
  prefill, sleep passes, evaluation), and the rules below inside ``jax.grad``/``jax.vjp``.
  The two forms agree to float32 rounding (tests/test_ops.py)."""
  return _scan_impl(q, k, v, beta, log_alpha, state, scale, rule)


def _scan_with_chunked_vjp_fwd(rule, chunk_size, unroll, *args):
  # The chunked form's own pullback (its custom VJP) is the residual: a pytree of arrays.
  return jax.vjp(functools.partial(_chunked_impl, rule, chunk_size, unroll), *args)


def _scan_with_chunked_vjp_bwd(rule, chunk_size, unroll, pullback, cotangents):
  del rule, chunk_size, unroll
  return pullback(cotangents)


_scan_with_chunked_vjp.defvjp(_scan_with_chunked_vjp_fwd, _scan_with_chunked_vjp_bwd)


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """The implementation that ``impl`` stands for on ``backend`` (default: JAX's): one of
  ``IMPLS`` other than "auto", or "scan+chunked" ("auto" on CPU: the scan's values, the
  chunked form's under differentiation)."""
  _check_choice("impl", impl, IMPLS)
  if impl != "auto":
    return impl
  backend = jax.default_backend() if backend is None else backend
  return _AUTO_IMPL.get(backend, "chunked")


def default_chunk_size(backend: str | None = None, head_dim: int | None = None) -> int:
  """The chunk length ``chunk_size=None`` stands for on ``backend`` (default: JAX's) with
  keys of ``head_dim`` (Dk; None: the backend's chunk for any key size)."""
  backend = jax.default_backend() if backend is None else backend
  if backend == "cpu" and head_dim is not None and head_dim <= SMALL_HEAD_DK:
    return SMALL_HEAD_CPU_CHUNK
  return CHUNK_SIZES.get(backend, 64)


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    scale: float | jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int | None = 64,
    rule: str = "gated_delta",
    unroll: int | bool = 1,
) -> tuple[jax.Array, jax.Array]:
  """Runs the fast-weight recurrence over a sequence.

  Args:
    q, k: ``[b t h k]`` queries and keys (the caller normalises them).
    v: ``[b t h v]`` values.
    beta: ``[b t h]`` write strengths, normally in (0, 1).
    log_alpha: ``[b t h]`` log of the decay, ``<= 0`` and finite.
    initial_state: ``[b h k v]`` state before the first token; ``None`` means zeros.
    scale: readout scale, default ``Dk ** -0.5``.
    impl: ``"scan"`` (per-token reference), ``"chunked"`` (chunkwise-parallel),
      ``"pallas"`` (the chunked form with its inter-chunk recurrence and outputs in a Pallas
      kernel: Triton on GPU, Mosaic on TPU, the slow Pallas interpreter elsewhere; needs
      chunk_size, Dk and Dv powers of two >= 16) or ``"auto"`` (chosen per backend: chunked
      on GPU and TPU; on CPU the scan's values, and the chunked form's values and backward
      pass under reverse-mode differentiation, so a forward-only call runs the faster scan
      and a gradient the faster chunked backward).
    chunk_size: chunk length of the chunked form (``>= 1``); a sequence shorter than one
      chunk uses its own length. ``None`` picks it per backend (``default_chunk_size``: 32 on
      CPU, 16 there for Dk <= 32, 64 on GPU and TPU); the default, 64, is the same on every
      backend.
    rule: ``"gated_delta"`` or ``"hebbian"``.
    unroll: chunks per iteration of the chunked form's loop over chunks, forwards and
      backwards (``lax.scan``'s ``unroll``: an int >= 1, or True for no loop at all, every
      chunk step written out; compilation takes longer). Results are the same; the speed
      differs per backend (docs/delta_rule.md). Used by ``impl="chunked"`` (and ``"auto"``
      where it runs the chunked form, on CPU under differentiation); the scan and the Pallas
      kernel ignore it.

  Returns:
    ``(o [b t h v] in v's dtype, final_state [b h k v] float32)``.

  Reverse-mode gradients work with every ``impl``; the chunked and Pallas forms have
  hand-written backward passes (``jax.custom_vjp``), so forward mode (``jax.jvp``,
  ``jax.jacfwd``) needs ``impl="scan"``.
  """
  _check_choice("impl", impl, IMPLS)
  _check_choice("rule", rule, RULES)
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}.")
  if not (unroll is True or (not isinstance(unroll, bool) and isinstance(unroll, int)
                             and unroll >= 1)):
    raise ValueError(f"unroll must be an int >= 1 or True (no loop), got {unroll!r}.")
  b, t, h, dk, dv = _check_sequence_inputs(q, k, v, beta, log_alpha, initial_state)
  if chunk_size is None:
    chunk_size = default_chunk_size(head_dim=dk)
  if impl == "pallas":
    problem = gated_delta_pallas.supported(chunk_size, dk, dv)
    if problem:
      raise ValueError(f"impl='pallas': {problem}; use impl='chunked' for these sizes.")
  if initial_state is None:
    state = jnp.zeros((b, h, dk, dv), jnp.float32)
  else:
    state = initial_state.astype(jnp.float32)
  scale = _default_scale(scale, dk)
  impl = resolve_impl(impl)
  if impl == "scan":
    o, final_state = _scan_impl(q, k, v, beta, log_alpha, state, scale, rule)
  elif impl == "scan+chunked":
    o, final_state = _scan_with_chunked_vjp(rule, chunk_size, unroll, q, k, v, beta, log_alpha,
                                            state, jnp.asarray(scale, jnp.float32))
  else:
    o, final_state = gated_delta_chunked.chunked_delta_rule(
        q, k, v, beta, log_alpha, state, scale=scale, chunk_size=chunk_size, rule=rule,
        kernel=impl == "pallas", unroll=unroll)
  return o.astype(v.dtype), final_state
