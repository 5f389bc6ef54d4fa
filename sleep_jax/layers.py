"""Flax layers of the hybrid model: norms, SwiGLU MLP, attention and fast-weight mixers, blocks.

Shape legend: b batch, t tokens of this call, c cache slots, h heads, d / k / v per-head widths,
m model width. Every mixer call is a *pass over a run of tokens* that may sit behind a window cache:

* `cache is None`: the tokens are the whole visible context (an empty window cache). Attention
  is plain causal attention over them; the short convolution starts from zeros.
* otherwise the tokens are appended to the cache at slot `cache_length` (a traced scalar). Attention
  sees the cache's valid slots plus the new tokens, limited to the last L tokens under sliding
  eviction; the short convolution continues from the cached tail. The updated cache is returned.

Positions (for RoPE) are cache slots, so they stay below the cache capacity on unbounded streams.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleep_jax import attention
from sleep_jax import ops
from sleep_jax.config import ModelConfig

Array = jax.Array
_dense_init = nn.initializers.lecun_normal()


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, computed in float32, returned in the input dtype."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


class Dense(nn.Module):
  """`x @ kernel` without bias: a float32 `kernel`, the product in `dtype` (what `nn.Dense` with
  `use_bias=False, param_dtype=float32` computes, with the same parameter tree).

  A call on one token (a decode step: `x` is `[b 1 m]`) accumulates in float32 and rounds the
  result to `dtype` once. Asked for a half-precision result of a matrix-vector product, XLA
  on a GPU writes the elementwise products of the whole weight matrix in that precision and
  sums them in a second kernel; with a float32 result it does both in one kernel and writes no
  products (docs/performance.md, "What the GPU programs launch"). In float32 nothing changes.
  """

  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _dense_init, (x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if x.ndim < 2 or x.shape[-2] != 1:
      return jax.lax.dot_general(x, kernel, dims)
    y = jax.lax.dot_general(x, kernel, dims, preferred_element_type=jnp.float32)
    return y.astype(self.dtype)


def _dense(features: int, dtype, name: str) -> Dense:
  return Dense(features, dtype, name=name)


class SwiGLU(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dt = self.config, self.config.compute_dtype
    gate = _dense(cfg.resolved_mlp_dim, dt, "gate")(x)
    up = _dense(cfg.resolved_mlp_dim, dt, "up")(x)
    return _dense(cfg.d_model, dt, "down")(nn.silu(gate) * up)


def rope(x: Array, positions, base: float) -> Array:
  """Rotary embedding, computed in float32 and returned in x's dtype.

  x: [b t h d] (d even). positions: integer (or float) positions that broadcast against the token
  axis: a scalar (every token rotated by the same angle, e.g. a shift of whole cache slots), [t],
  or [b t]. Rotations compose, rope(rope(x, p), s) == rope(x, p + s), up to float32 rounding.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # [.. half]
  # A heads axis before the last one: [] -> [1 half], [t] -> [t 1 half], [b t] -> [b t 1 half].
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _blocked(cfg: ModelConfig, with_cache: bool) -> bool:
  """Sliding windows by blocks of queries (`sleep_jax.attention`), for windows where blocks pay.

  On the XLA path always; on the cuDNN path only behind a cache, where the alternative is one
  call with an explicit mask (on an H200, L = 2048, B = 4, 16 heads x 128, bf16, blocks made a
  window pass 1.05x faster forward and 1.19x forward+backward). Without a cache cuDNN keeps one
  call with `local_window_size`: it skips the masked tiles itself. (Without a cache the splash
  path never asks: its kernel takes the window itself.)
  """
  if cfg.attention_impl == "cudnn" and not with_cache:
    return False
  return attention.blocks_pay(cfg.window) and not attention.dense_masks_forced()


def _dense_impl(cfg: ModelConfig) -> Optional[str]:
  """The `jax.nn.dot_product_attention` implementation behind a window cache. Splash needs a
  static mask, and the cache length is traced: "splash" attends there by XLA."""
  return None if cfg.attention_impl == "splash" else cfg.attention_impl


class Attention(nn.Module):
  """Causal multi-head softmax attention with RoPE over the window cache.

  The cache holds keys already rotated by their slot (`rope(k, slot)`), so a call rotates only its
  own queries and keys, never the whole cache: a decode step does not pay a rotation of every
  slot. `sleep_jax.evict` counter-rotates the keys it moves to earlier slots.

  Under sliding eviction on the XLA path, windows of at least `attention.MIN_BLOCKED_WINDOW`
  tokens attend by blocks of queries (`attention.sliding_window_attention`), each to the key
  slots its window reaches, instead of scoring every cache slot and masking most of them.
  With `attention_impl="splash"` a pass without a cache (causal, or a sliding window over more
  than L tokens) runs the splash kernel (`attention.splash_attention`), which skips masked tiles;
  behind a cache it attends as the XLA path does.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, cache: Optional[dict], cache_length: Optional[Array]):
    cfg, dt = self.config, self.config.compute_dtype
    b, t, _ = x.shape
    h, d = cfg.num_heads, cfg.resolved_head_dim
    q = _dense(h * d, dt, "q")(x).reshape(b, t, h, d)
    k = _dense(h * d, dt, "k")(x).reshape(b, t, h, d)
    v = _dense(h * d, dt, "v")(x).reshape(b, t, h, d)

    if cache is None:
      # The tokens are the whole context: plain causal attention, no mask tensor.
      pos = jnp.arange(t)
      k = rope(k, pos, cfg.rope_base)
      q = rope(q, pos, cfg.rope_base)
      sliding = cfg.eviction == "sliding" and t > cfg.window
      if cfg.attention_impl == "splash":
        out = attention.splash_attention(q, k, v, window=cfg.window if sliding else None)
      elif sliding and _blocked(cfg, with_cache=False):
        out = attention.sliding_window_attention(q, k, v, window=cfg.window,
                                                 implementation=cfg.attention_impl)
      else:
        local = (cfg.window - 1, 0) if sliding else None
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                           implementation=cfg.attention_impl)
      # As a cache starting at slot 0 would hold them: keys rotated by their slot.
      new_cache = {"k": k, "v": v}
    else:
      # RoPE uses the slot index as position; keys enter the cache rotated by theirs.
      q_pos = cache_length + jnp.arange(t)
      k = rope(k, q_pos, cfg.rope_base)
      ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                               cache_length, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                               cache_length, axis=1)
      q = rope(q, q_pos, cfg.rope_base)
      if cfg.eviction == "sliding" and _blocked(cfg, with_cache=True):
        # Each block of queries attends to the slice of slots its window can reach.
        out = attention.sliding_window_attention(q, ck.astype(dt), cv.astype(dt),
                                                 window=cfg.window, q_start=cache_length,
                                                 implementation=_dense_impl(cfg))
      else:
        k_pos = jnp.arange(ck.shape[1])
        if cfg.eviction == "sliding":
          visible = attention.sliding_window_mask(q_pos, k_pos, cfg.window)
        else:
          visible = k_pos[None, :] <= q_pos[:, None]
        out = attention.masked_attention(q, ck.astype(dt), cv.astype(dt), visible,
                                         implementation=_dense_impl(cfg))
      new_cache = {"k": ck, "v": cv}
    y = _dense(cfg.d_model, dt, "o")(out.reshape(b, t, h * d))
    return y, new_cache


class ShortConv(nn.Module):
  """Causal depthwise convolution along time, continuing from a cached tail of inputs."""

  width: int

  @nn.compact
  def __call__(self, x: Array, tail: Optional[Array]):
    """x: [b t c]; tail: [b width-1 c] (the inputs before x) or None for zeros."""
    channels = x.shape[-1]
    w = self.param("kernel", nn.initializers.normal(self.width ** -0.5), (self.width, channels),
                   jnp.float32)
    if tail is None:
      tail = jnp.zeros((x.shape[0], self.width - 1, channels), x.dtype)
    full = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
    t = x.shape[1]
    y = sum(full[:, j:j + t] * w[j].astype(x.dtype) for j in range(self.width))
    return y, full[:, t:]


def _l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class FastWeight(nn.Module):
  """Gated DeltaNet (or Hebbian) fast-weight mixer; the state S is [b h k v] float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, state: Array, cache: Optional[dict]):
    cfg, dt = self.config, self.config.compute_dtype
    b, t, _ = x.shape
    h, d = cfg.num_heads, cfg.resolved_head_dim
    qkv = _dense(3 * h * d, dt, "qkv")(x)
    qkv, tail = ShortConv(cfg.conv_size, name="conv")(qkv, None if cache is None else cache["conv"])
    qkv = nn.silu(qkv)
    q, k, v = (z.reshape(b, t, h, d) for z in jnp.split(qkv, 3, axis=-1))
    q, k = _l2_normalize(q), _l2_normalize(k)

    x32 = x.astype(jnp.float32)
    beta = nn.sigmoid(_dense(h, jnp.float32, "beta")(x32))
    a_log = self.param("A_log", lambda rng, s: jnp.log(jax.random.uniform(rng, s, jnp.float32, 1, 16)), (h,))
    dt_bias = self.param("dt_bias", _dt_bias_init, (h,))
    log_alpha = -jnp.exp(a_log) * nn.softplus(_dense(h, jnp.float32, "alpha")(x32) + dt_bias)

    if t == 1:
      o, state = ops.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], log_alpha[:, 0],
                                      state, rule=cfg.rule)
      o = o[:, None]
    else:
      o, state = ops.gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state,
                                      impl=cfg.delta_impl, chunk_size=cfg.resolved_chunk_size,
                                      rule=cfg.rule, unroll=cfg.delta_unroll)
    o = RMSNorm(cfg.norm_eps, name="head_norm")(o)
    gate = nn.silu(_dense(h * d, dt, "gate")(x)).reshape(b, t, h, d)
    y = _dense(cfg.d_model, dt, "o")((o * gate).reshape(b, t, h * d))
    return y, state, {"conv": tail}


def _dt_bias_init(rng, shape):
  # Step sizes log-uniform in [1e-3, 1e-1], stored through the inverse of softplus.
  dt = jnp.exp(jax.random.uniform(rng, shape, jnp.float32, jnp.log(1e-3), jnp.log(1e-1)))
  return dt + jnp.log(-jnp.expm1(-dt))


class Block(nn.Module):
  """Pre-norm residual block: x += Mixer(norm(x)); optionally x += MLP(norm(x))."""

  config: ModelConfig
  mixer: str  # "attention" | "fast_weight"
  mlp: bool

  @nn.compact
  def __call__(self, x: Array, state: Optional[Array], cache: Optional[dict],
               cache_length: Optional[Array]):
    cfg = self.config
    y = RMSNorm(cfg.norm_eps, name="mixer_norm")(x)
    if self.mixer == "attention":
      y, new_cache = Attention(cfg, name="attention")(y, cache, cache_length)
    else:
      y, state, new_cache = FastWeight(cfg, name="fast_weight")(y, state, cache)
    x = x + y
    if self.mlp:
      x = x + SwiGLU(cfg, name="mlp")(RMSNorm(cfg.norm_eps, name="mlp_norm")(x))
    return x, state, new_cache


class Stack(nn.Module):
  """Embed -> blocks -> final RMSNorm -> output projection (untied)."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
                              embedding_init=nn.initializers.normal(1.0))
    self.blocks = [Block(cfg, mixer, mlp, name=f"block_{i}")
                   for i, (mixer, mlp) in enumerate(cfg.block_kinds)]
    self.final_norm = RMSNorm(cfg.norm_eps)
    self.head = _dense(cfg.vocab_size, cfg.compute_dtype, "head")

  def embed(self, tokens: Array) -> Array:
    return self.embedding(tokens).astype(self.config.compute_dtype)

  def run_blocks(self, h: Array, state: tuple, cache: Optional[tuple],
                 cache_length: Optional[Array]):
    """One pass of every block over h [b t m]; returns (h, state, per-layer cache)."""
    new_state, new_cache = [], []
    for i, block in enumerate(self.blocks):
      h, s, c = block(h, state[i], None if cache is None else cache[i], cache_length)
      new_state.append(s)
      new_cache.append(c)
    return h, tuple(new_state), tuple(new_cache)

  def logits(self, h: Array) -> Array:
    return self.head(self.final_norm(h)).astype(jnp.float32)

  def __call__(self, tokens: Array, state: tuple):
    h, state, _ = self.run_blocks(self.embed(tokens), state, None, None)
    return self.logits(h), state

