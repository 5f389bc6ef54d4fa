"""Streaming over unbounded token streams: wake on every token, sleep at every window boundary.

    stream = Stream(params, batch_size=1, n=4)
    logits = stream.feed(prompt)                 # [b t vocab], any t; crosses boundaries as needed
    new_tokens = stream.generate(prompt, 32)     # greedy; temperature > 0 samples

The window cache holds at most L (hard) or 2L - 1 (sliding) tokens and the fast-weight state has a
fixed size, so the cost of a wake step does not grow with the tokens already seen.

At a boundary the stream sleeps on the window it just finished. The wake pass over that window is
exactly the first sleep pass (same starting state, same window cache prefix), so by default
(`shortcut=True`) the stream keeps wake's residual stream `h` and runs only the n - 1 remaining
passes. `shortcut=False` recomputes the plain definition, `sleep_window(start_state, start_cache,
window, n)`; the two agree up to float rounding (tested).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import model as model_lib
from sleep_jax.model import Params, WindowCache

Array = jax.Array


@flax.struct.dataclass
class StreamState:
  """Device-side state of a stream. `start_*` are snapshots taken at the current window's start."""

  state: tuple          # fast-weight state after the tokens seen so far
  cache: WindowCache    # window cache after the tokens seen so far
  start_state: tuple    # fast-weight state at the window's start (plain definition only)
  start_cache: WindowCache  # window cache at the window's start: the prefix sleep passes attend to
  hidden: Array         # [b L m] wake's final residual stream for this window (sleep's pass 1)
  window_tokens: Array  # [b L] this window's tokens


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


@functools.partial(jax.jit, donate_argnums=(1,))
def _wake_chunk(params: Params, ss: StreamState, tokens: Array, offset: Array):
  logits, h, state, cache = model_lib.wake_hidden(params, ss.state, ss.cache, tokens)
  hidden = jax.lax.dynamic_update_slice_in_dim(ss.hidden, h.astype(ss.hidden.dtype), offset, 1)
  window_tokens = jax.lax.dynamic_update_slice_in_dim(ss.window_tokens, tokens, offset, 1)
  return logits, ss.replace(state=state, cache=cache, hidden=hidden, window_tokens=window_tokens)


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=(1,))
def _boundary(params: Params, ss: StreamState, n: int, shortcut: bool) -> StreamState:
  cfg = params.config
  sliding = cfg.eviction == "sliding"
  if shortcut:
    # Wake already ran pass 1 over the window: continue from its h and state.
    state, final = ss.state, ss.cache
    if n > 1:
      prefix = ss.start_cache if sliding else None
      _, state, grown = model_lib.run_passes(params, ss.hidden, state, prefix, n - 1)
      final = grown if sliding else final
    cache = model_lib.evict(params, final)
  else:
    state, cache = model_lib.sleep_window(params, ss.start_state, ss.start_cache,
                                          ss.window_tokens, n)
  # Snapshots for the next window, taken only where they will be read (the plain definition,
  # or the retained prefix under sliding eviction); the live buffers are donated on every wake.
  start_state = ss.start_state if shortcut else _copy(state)
  start_cache = _copy(cache) if (sliding or not shortcut) else ss.start_cache
  return ss.replace(state=state, cache=cache, start_state=start_state, start_cache=start_cache)


class Stream:
  """Feeds an unbounded token stream through a sleep model (wake per token, sleep per window).

  Args:
    params: from `sleep_jax.init`; its config's eviction must be "hard" or "sliding".
    batch_size: streams advanced in lockstep.
    n: sleep passes at every boundary (>= 1; n = 1 is the ordinary hybrid model).
    shortcut: reuse the wake pass as the first sleep pass (n - 1 extra passes per boundary).

  The stream computes with `sleep_jax.inference_params(params)`: matrices cast to the compute
  dtype once (bit-identical results; with bfloat16 compute a copy of half the parameters' size).
  """

  def __init__(self, params: Params, batch_size: int, n: int, *, shortcut: bool = True):
    model_lib._check_params(params)
    cfg = params.config
    model_lib._check_sleepable(cfg, n, allow_zero=False)
    self.params, self.n, self.shortcut = params, n, bool(shortcut)
    self._weights = model_lib.inference_params(params)
    self.batch_size = batch_size
    state = model_lib.init_state(params, batch_size)
    cache = model_lib.init_cache(params, batch_size)
    L, m = cfg.window, cfg.d_model
    self._ss = StreamState(
        state=state, cache=cache, start_state=_copy(state), start_cache=_copy(cache),
        hidden=jnp.zeros((batch_size, L, m), cfg.compute_dtype),
        window_tokens=jnp.zeros((batch_size, L), jnp.int32))
    self.position = 0        # tokens seen in the current window
    self.tokens_seen = 0
    self.windows_slept = 0

  @property
  def state(self) -> tuple:
    """The current fast-weight state."""
    return self._ss.state

  @property
  def cache(self) -> WindowCache:
    return self._ss.cache

  def feed(self, tokens) -> Array:
    """Wakes on `tokens` [b t] (sleeping at every boundary crossed); returns logits [b t vocab]."""
    cfg = self.params.config
    tokens = jnp.asarray(tokens, jnp.int32)
    model_lib._check_tokens("Stream.feed", "tokens", tokens, cfg)
    if tokens.shape[0] != self.batch_size:
      raise ValueError(f"Stream.feed: tokens have batch {tokens.shape[0]}, the stream was made "
                       f"for batch_size={self.batch_size}")
    outputs, i, total = [], 0, tokens.shape[1]
    while i < total:
      take = min(total - i, cfg.window - self.position)
      logits, self._ss = _wake_chunk(self._weights, self._ss, tokens[:, i:i + take],
                                        jnp.int32(self.position))
      outputs.append(logits)
      i += take
      self.position += take
      self.tokens_seen += take
      if self.position == cfg.window:
        self._ss = _boundary(self._weights, self._ss, self.n, self.shortcut)
        self.position = 0
        self.windows_slept += 1
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)

  def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0,
               rng: Optional[Array] = None, top_k: Optional[int] = None) -> np.ndarray:
    """Feeds `prompt` [b t], then generates `max_new_tokens` tokens, sleeping at boundaries.

    temperature 0 is greedy decoding; otherwise tokens are sampled from softmax(logits /
    temperature), optionally restricted to the `top_k` most likely. Returns int32 [b new].
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
      raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
      raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(...)")
    logits = self.feed(prompt)[:, -1]
    out = []
    for _ in range(max_new_tokens):
      if temperature == 0:
        token = jnp.argmax(logits, axis=-1)
      else:
        rng, sub = jax.random.split(rng)
        scaled = logits / temperature
        if top_k is not None:
          kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
          scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        token = jax.random.categorical(sub, scaled, axis=-1)
      token = token.astype(jnp.int32)[:, None]
      out.append(token)
      logits = self.feed(token)[:, -1]
    return np.asarray(jnp.concatenate(out, axis=1))
