"""The model's public functions: init, init_state, init_cache, sleep, wake, and their building blocks.

Shape legend: b batch, L window length, t tokens of a call, c cache slots, m model width,
h heads, k / v per-head key / value widths.

Two kinds of memory cross tokens:

* the fast-weight `state`: a tuple with one entry per block, `None` for attention blocks and a float32
  `[b h k v]` matrix for fast-weight blocks. It is the only thing that survives an eviction boundary.
* the window cache (`WindowCache`): attention K/V, the short-convolution tails and the number of
  filled slots. It is cleared (hard eviction) or trimmed to the last L - 1 tokens (sliding eviction)
  at every boundary.

`sleep` runs n passes of the block stack over a window (one `lax.scan` whose carry is
`(h, state)`); `wake` is one ordinary pass over new tokens behind the window cache.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from sleep_jax.config import ModelConfig
from sleep_jax.layers import Block, Stack, rope

Array = jax.Array


@flax.struct.dataclass
class Params:
  """Model parameters: a pytree of float32 arrays whose static part carries the config."""

  weights: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class WindowCache:
  """Everything local to the current window: per-block K/V or conv tail, and the filled slots."""

  layers: tuple
  length: Array  # int32 scalar: slots in use (also the position of the next token)
  capacity: int = flax.struct.field(pytree_node=False, default=0)  # K/V slots


# ----------------------------------------------------------------------------- construction


def init(config: ModelConfig, rng: Array) -> Params:
  """Initialises float32 parameters for `config`."""
  if not isinstance(config, ModelConfig):
    raise TypeError(f"init expects a sleep_jax.ModelConfig, got {type(config).__name__}")
  probe = jnp.zeros((1, min(config.window, 8)), jnp.int32)
  state = _zero_state(config, 1)
  variables = jax.jit(Stack(config).init)(rng, probe, state)
  return Params(weights=variables["params"], config=config)


# Modules whose kernels the model applies in float32 whatever the compute dtype (the beta and
# alpha gates of fast-weight blocks); every other kernel, the short convolution's and the embedding
# table are cast to the compute dtype before each use.
_FLOAT32_KERNELS = ("beta", "alpha")


def inference_params(params: Params) -> Params:
  """`params` with every weight the model casts to the compute dtype stored in that dtype.

  The model keeps float32 parameters and casts its matrices (dense kernels, the short
  convolution, the embedding table) to the compute dtype where it uses them, on every call. For
  inference, doing that once saves the cast on every wake step (and, in bfloat16, half the weight
  bytes read): `wake`, `sleep` and `Stream` give bit-identical results with the returned
  parameters. Norm scales, decay parameters and the beta / alpha gates (computed in float32)
  stay float32. With float32 compute `params` is returned as it is. Not for training: gradients
  would come back in the compute dtype.
  """
  _check_params(params)
  dtype = params.config.compute_dtype
  if dtype == jnp.float32:
    return params

  def cast(path, w):
    name, owner = path[-1].key, (path[-2].key if len(path) > 1 else None)
    if name == "embedding" or (name == "kernel" and owner not in _FLOAT32_KERNELS):
      return w.astype(dtype)
    return w

  return params.replace(weights=jax.tree_util.tree_map_with_path(cast, params.weights))


def _zero_state(config: ModelConfig, batch_size: int) -> tuple:
  h, d = config.num_heads, config.resolved_head_dim
  return tuple(
      jnp.zeros((batch_size, h, d, d), jnp.float32) if kind == "fast_weight" else None
      for kind, _ in config.block_kinds)


def init_state(params: Params, batch_size: int) -> tuple:
  """The fast-weight state at the start of a sequence: zeros, float32, `[b h k v]` per block."""
  _check_params(params)
  _check_batch_size(batch_size)
  return _zero_state(params.config, batch_size)


def init_cache(params: Params, batch_size: int, capacity: Optional[int] = None) -> WindowCache:
  """An empty window cache.

  Its K/V capacity is L under hard eviction and 2L - 1 under sliding eviction (the L - 1 retained
  tokens plus a new window). With eviction="none" there is no bound, so `capacity` must be given.
  """
  _check_params(params)
  _check_batch_size(batch_size)
  cfg = params.config
  if capacity is None:
    capacity = cfg.cache_capacity
    if capacity is None:
      raise ValueError("init_cache: eviction='none' keeps every token; pass capacity= (the most "
                       "tokens the cache will hold).")
  elif isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f"init_cache: capacity must be a positive int, got {capacity!r}")
  h, d, dt = cfg.num_heads, cfg.resolved_head_dim, cfg.compute_dtype
  layers = []
  for kind, _ in cfg.block_kinds:
    if kind == "attention":
      layers.append({"k": jnp.zeros((batch_size, capacity, h, d), dt),
                     "v": jnp.zeros((batch_size, capacity, h, d), dt)})
    else:
      layers.append({"conv": jnp.zeros((batch_size, cfg.conv_size - 1, 3 * h * d), dt)})
  return WindowCache(layers=tuple(layers), length=jnp.zeros((), jnp.int32), capacity=capacity)


# ----------------------------------------------------------------------------- one pass


def _apply(params: Params, method: str, *args):
  stack = Stack(params.config)
  return stack.apply({"params": params.weights}, *args, method=getattr(Stack, method))


def embed(params: Params, tokens: Array) -> Array:
  """Token embeddings `[b t m]` in the compute dtype."""
  return _apply(params, "embed", tokens)


def logits_from_hidden(params: Params, h: Array) -> Array:
  """Final norm and output projection; float32 logits `[b t vocab]`."""
  return _apply(params, "logits", h)


def forward_pass(params: Params, h: Array, state: tuple, cache: Optional[WindowCache]):
  """One pass of every block over `h` [b t m].

  With `cache=None` the tokens are the whole visible context (empty window cache) and the result's
  cache is None. Otherwise the tokens are appended to `cache` and the grown cache is returned.
  Returns `(h, state, cache)`.
  """
  layers = None if cache is None else cache.layers
  length = None if cache is None else cache.length
  if params.config.scan_layers and h.shape[1] > 1:
    h, state, layers = _scanned_blocks(params, h, state, layers, length)
  else:
    h, state, layers = _apply(params, "run_blocks", h, state, layers, length)
  if cache is None:
    return h, state, None
  return h, state, cache.replace(layers=layers, length=cache.length + h.shape[1])


def _scanned_blocks(params: Params, h: Array, state: tuple, layers: Optional[tuple],
                    length: Optional[Array]):
  """`Stack.run_blocks` as a `lax.scan` over the repeats of the layout's unit.

  Block `j + r * u` (u = unit length) is position j of repeat r: its weights, state and cache
  entry are stacked over r and the scan body applies the u blocks of one repeat. Without a cache
  the per-block K/V of the new tokens are not needed and are not stacked.
  """
  cfg = params.config
  unit = cfg.layer_unit
  repeats = cfg.num_layers // unit

  def stacked(per_block, j):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(per_block[j + r * unit]
                                                     for r in range(repeats)))

  weights = [params.weights[f"block_{i}"] for i in range(cfg.num_layers)]
  xs = tuple((stacked(weights, j), stacked(state, j),
              None if layers is None else stacked(layers, j)) for j in range(unit))

  def body(h, xs):
    out = []
    for (mixer, mlp), (w, s, c) in zip(cfg.block_kinds[:unit], xs):
      h, s, c = Block(cfg, mixer, mlp).apply({"params": w}, h, s, c, length)
      out.append((s, None if layers is None else c))
    return h, tuple(out)

  h, out = jax.lax.scan(body, h, xs)
  per_block = [jax.tree.map(lambda x, r=i // unit: x[r], out[i % unit])
               for i in range(cfg.num_layers)]
  new_state = tuple(s for s, _ in per_block)
  new_layers = None if layers is None else tuple(c for _, c in per_block)
  return h, new_state, new_layers


@jax.jit
def evict(params: Params, cache: WindowCache) -> WindowCache:
  """The window cache after an eviction boundary.

  Hard eviction drops everything. Sliding eviction keeps the K/V of the last L - 1 tokens, moved to
  slots 0..L-2 (keys counter-rotated to their new slots), and the short-convolution tails.
  """
  cfg = params.config
  if cfg.eviction != "sliding":
    # Stale K/V need no clearing: slots at or after `length` are invisible (causal mask) until
    # they are written again. The conv tails restart from zeros.
    layers = tuple({"conv": jnp.zeros_like(layer["conv"])} if "conv" in layer else layer
                   for layer in cache.layers)
    return cache.replace(layers=layers, length=jnp.zeros((), jnp.int32))
  keep = cfg.window - 1
  start = jnp.maximum(cache.length - keep, 0)
  layers = []
  for layer in cache.layers:
    if "k" in layer:
      layer = {"k": _move_to_front(layer["k"], start, keep, rope_base=cfg.rope_base),
               "v": _move_to_front(layer["v"], start, keep)}
    layers.append(layer)
  return cache.replace(layers=tuple(layers), length=jnp.minimum(cache.length, keep).astype(jnp.int32))


def _move_to_front(buf: Array, start: Array, size: int, rope_base: Optional[float] = None) -> Array:
  """Slots start..start+size-1 of `buf` [b c h d] moved to slots 0..size-1, the rest zeroed.

  With `rope_base`, `buf` holds keys rotated by their slot, R(s) k; the moved keys are turned by
  -start so that they hold R(s - start) k = R(-start) R(s) k, their new slot's rotation. The turn
  runs in float32 and is rounded once to the cache dtype. At window boundaries (`Stream`, `loss`,
  `sleep_window` evict a cache of 2L - 1 filled slots, or L after the first window) the kept slots
  are the newest window's, written since the last eviction, so every key is moved at most once
  before it leaves the cache: a bfloat16 key carries at most one extra rounding (about 2^-8
  relative), never a growing drift. Calling `evict` more often than once per window can move a key
  again, one more rounding per move.
  """
  kept = jax.lax.dynamic_slice_in_dim(buf, start, size, axis=1)
  if rope_base is not None:
    kept = rope(kept, -start, rope_base)
  return jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(buf), kept, 0, axis=1)


def _batch_of(cache: WindowCache) -> int:
  return jax.tree.leaves(cache.layers)[0].shape[0]


# ----------------------------------------------------------------------------- sleep


_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(config: ModelConfig, fn):
  """Wraps one pass in `jax.checkpoint` with the config's named policy."""
  if config.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=_POLICIES[config.remat])


def run_passes(params: Params, h: Array, state: tuple, prefix: Optional[WindowCache], n: int,
               *, grad_passes: Optional[int] = None):
  """n offline passes over a window: one `lax.scan` with carry `(h, state)`.

  `prefix` is the window cache at the window's start (None when it is empty); every pass attends to
  it plus the window recomputed from the current `h`. Returns `(h, state, cache)` where `cache` is
  the prefix grown by the final pass's K/V and conv tails (None when `prefix` is None).
  With `grad_passes=k < n`, the first n - k passes run under `stop_gradient` (truncated BPTT).
  """
  cfg = params.config

  def one_pass(carry, _):
    h, state, _ = carry
    return forward_pass(params, h, state, prefix), None

  body = remat(cfg, one_pass)
  carry = (h, state, prefix)

  def scan(carry, length):
    if length == 0:
      return carry
    return jax.lax.scan(body, carry, None, length=length)[0]

  if grad_passes is not None and grad_passes < n:
    carry = jax.lax.stop_gradient(scan(carry, n - grad_passes))
    n = grad_passes
  return scan(carry, n)


@functools.partial(jax.jit, static_argnums=4, static_argnames="grad_passes")
def sleep_window(params: Params, state: tuple, cache: WindowCache, ctx: Array, n: int, *,
                 grad_passes: Optional[int] = None):
  """Sleeps on a window that sits behind `cache` (its window cache at the window's start).

  Returns `(state, cache)`: the consolidated state and the window cache after eviction. This is the
  general form of `sleep` for sliding eviction, where a window attends to the retained K/V of the
  previous one; under hard eviction the cache at a window start is always empty.
  """
  cfg = params.config
  _check_sleepable(cfg, n, allow_zero=False)
  h = embed(params, ctx)
  prefix = cache if cfg.eviction == "sliding" else None
  _, state, final = run_passes(params, h, state, prefix, n, grad_passes=grad_passes)
  if final is None:
    return state, init_cache(params, ctx.shape[0])
  return state, evict(params, final)


def sleep(params: Params, state: tuple, ctx: Array, n: int) -> tuple:
  """Consolidates the window `ctx` [b L] into the fast-weight state with n offline passes.

  `h = Embed(ctx)`; then n times `(h, state) = Blocks(h, state)`, every block over the whole window,
  attention recomputed from the current h, fast-weight layers continuing from the state the previous
  pass left. n = 0 returns `state`; n = 1 gives the state one wake pass over the window leaves.
  The window is taken to start with an empty window cache (hard eviction, or the first window of a
  stream); `sleep_window` takes an explicit cache for sliding eviction.
  """
  _check_params(params)
  cfg = params.config
  _check_sleepable(cfg, n, allow_zero=True)
  _check_tokens("sleep", "ctx", ctx, cfg, length=cfg.window)
  _check_state("sleep", state, cfg, ctx.shape[0])
  if n == 0:
    return state
  return _sleep(params, state, ctx, n)


@functools.partial(jax.jit, static_argnums=3)
def _sleep(params: Params, state: tuple, ctx: Array, n: int) -> tuple:
  _, state, _ = run_passes(params, embed(params, ctx), state, None, n)
  return state


# ----------------------------------------------------------------------------- wake


def wake_hidden(params: Params, state: tuple, cache: WindowCache, tokens: Array):
  """`wake` that also returns the final residual stream h [b t m] (before the final norm)."""
  h, state, cache = forward_pass(params, embed(params, tokens), state, cache)
  return logits_from_hidden(params, h), h, state, cache


def wake(params: Params, state: tuple, cache: WindowCache, tokens: Array):
  """One ordinary pass over `tokens` [b t] behind the window cache; returns (logits, state, cache).

  Feeding a window token by token equals one call over the whole window. The caller evicts at
  boundaries (see `evict`, or `sleep_jax.streaming.Stream` which does it all). Tokens that do not
  fit the cache raise a ValueError; inside an outer `jax.jit`, where the length is not known on
  the host, they give NaN logits.
  """
  _check_params(params)
  cfg = params.config
  _check_tokens("wake", "tokens", tokens, cfg)
  _check_state("wake", state, cfg, tokens.shape[0])
  _check_cache("wake", cache, cfg, tokens.shape[0], tokens.shape[1])
  return _wake(params, state, cache, tokens)


@jax.jit
def _wake(params: Params, state: tuple, cache: WindowCache, tokens: Array):
  logits, _, state, cache = wake_hidden(params, state, cache, tokens)
  # Under an outer jit the capacity check of `wake` cannot read the length on the host, and the
  # cache update would clamp, overwriting the last slots: such a call returns NaN logits instead.
  logits = jnp.where(cache.length > cache.capacity, jnp.nan, logits)
  return logits, state, cache


# ----------------------------------------------------------------------------- validation


def _check_params(params) -> None:
  if not isinstance(params, Params):
    raise TypeError("expected the Params returned by sleep_jax.init(config, rng), got "
                    f"{type(params).__name__}")


def _check_batch_size(batch_size) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_sleepable(cfg: ModelConfig, n, allow_zero: bool) -> None:
  if isinstance(n, bool) or not isinstance(n, int):
    raise ValueError(f"n (the number of sleep passes) must be a Python int, got {n!r}; it is "
                     "static: the passes are one lax.scan of length n")
  lowest = 0 if allow_zero else 1
  if n < lowest:
    raise ValueError(f"n (the number of sleep passes) must be >= {lowest}, got {n}")
  if cfg.eviction == "none":
    raise ValueError("sleep needs an eviction boundary: ModelConfig.eviction is 'none'; use "
                     "'hard' or 'sliding'")


def _check_tokens(fn: str, name: str, x, cfg: ModelConfig, length: Optional[int] = None) -> None:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"{fn}: {name} must be an int32 array [batch, tokens], got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{fn}: {name} must hold integer token ids (int32), got dtype {dtype}")
  if length is not None and shape[1] != length:
    raise ValueError(f"{fn}: {name} must be one window of ModelConfig.window={length} tokens, "
                     f"got shape {tuple(shape)}")
  if shape[1] < 1:
    raise ValueError(f"{fn}: {name} must hold at least one token, got shape {tuple(shape)}")


def _check_state(fn: str, state, cfg: ModelConfig, batch: int) -> None:
  h, d = cfg.num_heads, cfg.resolved_head_dim
  if not isinstance(state, (tuple, list)) or len(state) != cfg.num_layers:
    raise ValueError(f"{fn}: state must be the tuple from init_state (one entry per block, "
                     f"{cfg.num_layers} blocks), got {type(state).__name__}")
  for i, (kind, _) in enumerate(cfg.block_kinds):
    s = state[i]
    if kind == "attention":
      if s is not None:
        raise ValueError(f"{fn}: state[{i}] belongs to an attention block and must be None")
      continue
    expected = (batch, h, d, d)
    if getattr(s, "shape", None) != expected or s.dtype != jnp.float32:
      raise ValueError(f"{fn}: state[{i}] must be float32 {expected}, got "
                       f"{getattr(s, 'dtype', None)} {getattr(s, 'shape', None)}")


def _check_cache(fn: str, cache, cfg: ModelConfig, batch: int, new_tokens: int) -> None:
  if not isinstance(cache, WindowCache) or len(cache.layers) != cfg.num_layers:
    raise ValueError(f"{fn}: cache must be the WindowCache from init_cache, got "
                     f"{type(cache).__name__}")
  capacity = cache.capacity
  if _batch_of(cache) != batch:
    raise ValueError(f"{fn}: cache was made for batch {_batch_of(cache)}, tokens have batch {batch}")
  if isinstance(cache.length, jax.core.Tracer):
    return
  if int(cache.length) + new_tokens > capacity:
    raise ValueError(f"{fn}: {new_tokens} new tokens do not fit the window cache "
                     f"({int(cache.length)} of {capacity} slots used); evict at the window "
                     "boundary first (sleep_jax.evict, or use sleep_jax.streaming.Stream)")
