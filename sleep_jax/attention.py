"""Causal sliding-window attention that skips the blocks the window masks away.

With a window of L tokens, a query at slot p sees the keys at slots p - L < s <= p. One call of
`jax.nn.dot_product_attention` with a mask (its XLA implementation, used on the CPU, on TPU and on
GPU unless cuDNN is asked for) scores every query against every key and masks afterwards: for the
model's window-cache pass (t = L queries against the 2L - 1 slots of a sliding cache) about half of
the scores are thrown away, for a long sequence almost all of them.

`sliding_window_attention` cuts the queries into blocks of `bq`. The queries of a block starting at
slot p0 can only see slots [p0 - L + 1, p0 + bq), so each block attends to a slice of
`bq + L - 1` keys taken with `lax.dynamic_slice_in_dim` (p0 may be traced, e.g. the cache length)
with the small mask that slice needs: t (bq + L - 1) scores instead of t c. At bq = L / 4 and
t = L, c = 2L - 1 that is 1.25 L^2 instead of 2 L^2; a decode step (t = 1) scores L slots instead
of 2L - 1.

Shape legend: b batch, t queries, c key slots, h heads, d per-head width, n block length.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array

# Below this window the extra calls cost more than the masked scores they save: measured on a
# 2-core CPU (t = L queries, 2L - 1 slots, 2-4 heads of 16-64, forward and forward+backward),
# blocks were 0.3-0.8x the speed of one masked call at L = 8..64, 1.05-1.1x at L = 128 and
# 1.1-1.6x at L = 256 (docs/performance.md).
MIN_BLOCKED_WINDOW = 128

# Up to this many blocks the loop over blocks is unrolled (the fastest form measured for forward
# plus backward, against `lax.map` and a gather of all key slices at once); beyond it (long
# sequences without a cache) full blocks run under `lax.map`, so compile time stays bounded.
MAX_UNROLLED_BLOCKS = 8


_DENSE_MASKS = [False]


@contextlib.contextmanager
def force_dense_masks() -> Iterator[None]:
  """Within this context, the model's sliding-window attention traces as one masked call (the path
  without blocks), for comparisons. It acts at trace time: functions compiled before keep the path
  they were traced with, so call `jax.clear_caches()` when entering and leaving."""
  _DENSE_MASKS.append(True)
  try:
    yield
  finally:
    _DENSE_MASKS.pop()


def dense_masks_forced() -> bool:
  return _DENSE_MASKS[-1]


def blocks_pay(window: int) -> bool:
  """Whether the model should use `sliding_window_attention` for a window of L (measured on the
  XLA path on CPU; `layers._blocked` says where the model uses it)."""
  return window >= MIN_BLOCKED_WINDOW


def block_size(t: int, window: int) -> int:
  """Queries per block for t queries under a window of L.

  Each query of a block of n scores n + L - 1 keys to use at most L: the waste is n - 1 keys per
  query, so smaller blocks waste less, but every block is one more call. L / 4 (rounded, at
  least 1) keeps the waste at a quarter of L while t = L needs only 4 blocks; on the CPU
  (forward+backward, L = 512 and 1024) L / 2 was 1.7x slower and L / 8 within 8% either way.
  A divisor of t within a factor 2 of that is preferred, so that every block has the same shape
  (no short last block); fewer than L / 4 queries (a decode step, a short chunk) form one block.
  """
  _check_int("t", t)
  _check_int("window", window)
  target = max(1, round(window / 4))
  if t <= target:
    return t
  if t % target == 0:
    return target
  divisors = [n for n in range(max(1, target // 2), 2 * target + 1) if t % n == 0]
  return min(divisors, key=lambda n: (abs(n - target), n)) if divisors else target


def sliding_window_attention(q: Array, k: Array, v: Array, *, window: int,
                             q_start: Union[int, Array] = 0, block: Optional[int] = None,
                             implementation: Optional[str] = None) -> Array:
  """Causal attention limited to the last `window` keys, by blocks of queries.

  Args:
    q: [b t h d] queries at slots `q_start + arange(t)`.
    k, v: [b c h d] keys and values at slots `0 .. c - 1` (a window cache, or the tokens
      themselves with `q_start=0`). Slots after a query's own are never seen, so stale cache slots
      beyond the filled ones do no harm.
    window: L >= 1; the query at slot p sees slots s with p - L < s <= p.
    q_start: slot of the first query, a Python int or a traced int32 scalar.
      `q_start + t <= c` is the caller's promise (it is not checked under jit).
    block: queries per block; None picks `block_size(t, window)`. When a block's key slice would
      not be shorter than c, the whole call is one masked call (no gain from blocks).
    implementation: forwarded to `jax.nn.dot_product_attention` for every block. Each block
      carries a boolean mask (the slice start may be clamped at the cache's ends, so the band is
      not at a static offset); with "cudnn" the mask becomes a bias (fp16/bf16 only) and odd
      lengths are padded to even ones (`masked_attention`).

  Returns:
    [b t h d] in the dtype of `v`; scores scaled by d^-1/2, softmax in float32, as
    `jax.nn.dot_product_attention` computes them.
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"sliding_window_attention: q [b t h d] and k, v [b c h d] of one shape "
                     f"expected, got q {q.shape}, k {k.shape}, v {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"sliding_window_attention: q {q.shape} and k {k.shape} must agree on b, h "
                     "and d")
  _check_int("window", window)
  t, c = q.shape[1], k.shape[1]
  n = block_size(t, window) if block is None else block
  _check_int("block", n)
  n = min(n, t)
  span = n + window - 1  # keys a block of n queries can see
  if span >= c:
    return _attend(q, k, v, q_start, 0, window, implementation)

  def one_block(q_block, first):
    # `first` is the block's offset among the queries (static int or traced).
    p0 = q_start + first
    size = q_block.shape[1]
    length = size + window - 1
    # Clamped into the cache; the mask below uses the clamped start, so it stays exact.
    start = jnp.clip(p0 - window + 1, 0, c - length)
    k_block = jax.lax.dynamic_slice_in_dim(k, start, length, axis=1)
    v_block = jax.lax.dynamic_slice_in_dim(v, start, length, axis=1)
    return _attend(q_block, k_block, v_block, p0, start, window, implementation)

  full = t // n
  if full <= MAX_UNROLLED_BLOCKS:
    outs = [one_block(q[:, i * n:(i + 1) * n], i * n) for i in range(full)]
  else:
    b, _, h, d = q.shape
    blocks = jnp.moveaxis(q[:, :full * n].reshape(b, full, n, h, d), 1, 0)
    mapped = jax.lax.map(lambda args: one_block(args[1], args[0] * n),
                         (jnp.arange(full), blocks))
    outs = [jnp.moveaxis(mapped, 0, 1).reshape(b, full * n, h, d)]
  if t % n:
    outs.append(one_block(q[:, full * n:], full * n))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def sliding_window_mask(q_slots: Array, k_slots: Array, window: int) -> Array:
  """[t c] boolean: query slot p sees key slot s when p - window < s <= p."""
  q_slots, k_slots = q_slots[:, None], k_slots[None, :]
  return (k_slots <= q_slots) & (k_slots > q_slots - window)


def masked_attention(q: Array, k: Array, v: Array, mask: Array, *,
                     implementation: Optional[str] = None,
                     even_lengths: Optional[bool] = None) -> Array:
  """`jax.nn.dot_product_attention` with a [t c] boolean mask, padded for cuDNN where needed.

  cuDNN takes a mask as an additive bias, and differentiating attention with a bias needs an even
  number of queries and of keys (JAX refuses odd ones with "Unsupported sequence length"): a
  sliding cache has 2L - 1 slots, and windows such as L = 75 are odd. With `even_lengths` (the
  default for `implementation="cudnn"`) an odd key axis gets one slot that no query sees, and an
  odd query axis one query whose output is dropped; the result is unchanged.
  """
  if even_lengths is None:
    even_lengths = implementation == "cudnn"
  t, c = q.shape[1], k.shape[1]
  pad_t, pad_c = (t % 2, c % 2) if even_lengths else (0, 0)
  if pad_c:
    k, v = (jnp.pad(x, [(0, 0), (0, 1), (0, 0), (0, 0)]) for x in (k, v))
  if pad_t:
    q = jnp.pad(q, [(0, 0), (0, 1), (0, 0), (0, 0)])
  mask = jnp.pad(mask, [(0, pad_t), (0, pad_c)])   # padded rows and columns see nothing
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None],
                                     implementation=implementation)
  return out[:, :t]


def _attend(q, k, v, q_start, k_start, window, implementation):
  """One masked call: queries at q_start + arange(t), keys at k_start + arange(c)."""
  mask = sliding_window_mask(q_start + jnp.arange(q.shape[1]), k_start + jnp.arange(k.shape[1]),
                             window)
  return masked_attention(q, k, v, mask, implementation=implementation)


def _check_int(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"sliding_window_attention: {name} must be an integer >= {minimum}, "
                     f"got {value!r}")


# ----------------------------------------------------------------------------- splash (TPU)

# Splash tiles are multiples of the TPU's 128 lanes. The tile edge is the largest of these that
# divides the sequence padded to a multiple of 128: fewer, larger tiles, up to 512 (not tuned:
# that needs a TPU to time on).
SPLASH_TILES = (512, 256, 128)
_LANES = 128


def splash_attention(q: Array, k: Array, v: Array, *, window: Optional[int] = None) -> Array:
  """Causal attention of t tokens to themselves (no cache) by JAX's splash-attention kernel.

  The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`, Pallas/Mosaic) takes the mask as
  a static pattern and skips every tile the mask removes: under the causal mask the m (m - 1) / 2
  tiles above the diagonal of m x m (6 of 16 at m = 4; about half for long sequences), under a
  window of L over t >> L tokens all but about (L + tile) / t of them. On a TPU it runs the
  Mosaic kernel (also when compiling ahead of time for a TPU topology from another host:
  `jax.lax.platform_dependent` picks it at lowering); on any other backend the Pallas interpreter
  runs the same kernel, slowly (tests).

  Args:
    q, k, v: [b t h d], the tokens' own queries, keys and values (slots 0 .. t - 1).
    window: None for plain causal attention; else L >= 1, the query at slot p sees slots
      p - L < s <= p (as `local_window_size=(L - 1, 0)` and `sliding_window_mask`).

  Returns:
    [b t h d] in q's dtype; scores scaled by d^-1/2, softmax in float32. The sequence is padded to
    a multiple of 128 with tokens after every real one, which no real query sees.

  Under a mesh set with `jax.set_mesh` (as `experiments.train` and `experiments.aot` do), the
  kernel runs per device inside `jax.shard_map`, batch over ("data", "fsdp") and heads over
  "tensor" where they divide. Without one, a multi-device jit fails to lower it on a TPU
  (XLA cannot partition a Mosaic kernel): set the mesh around the jitted call.
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"splash_attention: q, k, v of one shape [b t h d] expected, got q "
                     f"{q.shape}, k {k.shape}, v {v.shape}")
  if window is not None:
    _check_int("window", window)
  t, d = q.shape[1], q.shape[3]
  padded = -(-t // _LANES) * _LANES
  tile = next(n for n in SPLASH_TILES if padded % n == 0)
  q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)

  def heads_first(x):  # [b t h d] -> [b h T d]
    return jnp.pad(x, [(0, 0), (0, padded - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

  def attend(q, k, v):  # one device's share of the batch and heads
    heads = q.shape[2]
    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    mosaic = _splash_kernel(padded, heads, window, tile, interpret=False)
    interpreted = _splash_kernel(padded, heads, window, tile, interpret=True)
    out = jax.lax.platform_dependent(q, k, v, tpu=jax.vmap(mosaic),
                                     default=jax.vmap(interpreted))
    return out.transpose(0, 2, 1, 3)[:, :t]

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return attend(q, k, v)
  # A Mosaic kernel cannot be partitioned by XLA: under a mesh each device runs it on its own
  # batch rows and heads (the model's layout, `sleep_jax.sharding`).
  from sleep_jax import sharding  # pylint: disable=g-import-not-at-top
  spec = sharding.logical_spec(q.shape, ("batch", "length", "heads", "head_dim"), mesh)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def _splash_kernel(length: int, heads: int, window: Optional[int], tile: int, *, interpret: bool):
  """The splash kernel (forward and backward) for [h T d] inputs. Built at every trace: the
  NumPy layout of the mask's tiles, the costly part, is cached by JAX per mask and tile shape;
  the kernel itself holds arrays of the trace that builds it."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  shape = (length, length)
  mask = (splash.CausalMask(shape) if window is None
          else splash.LocalMask(shape, window_size=(window - 1, 0), offset=0))
  tiles = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                            block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                            block_q_dq=tile, block_kv_dq=tile)
  return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), head_shards=1,
                                q_seq_shards=1, block_sizes=tiles, interpret=interpret)
