"""Per-token wake latency of a sleep model vs a same-size full-attention model, over context length.

The sleep model (default GPU sizes: 8 blocks `AGAGAGAG`, d = 2048, 16 heads of 128, L = 2048,
hard eviction, n = 4) really streams the context: `sleep_jax.streaming.Stream` is fed the
tokens in pieces of up to a window (wake prefills, then at every boundary the sleep passes and
eviction), so the fast-weight state and the window cache are exactly those after C tokens.
Then one-token steps of the jitted `sleep_jax.wake` are timed from a copy of that state and
cache (boundaries are never timed; a step's cost cannot depend on C because the window cache
has a fixed capacity, L slots under hard eviction, and the state a fixed size; the cache fill at
the first timed step, C mod L, is recorded). The steps of every context are timed in one loop,
one step of each in turn, so that background load cannot pose as a trend over context.

The full-attention model has the same width and depth with every block attention
(`ModelConfig(layout="AAAAAAAA", eviction="none")`) and decodes one token behind a KV cache
`init_cache(params, b, capacity=C + steps)` holding C tokens. Its cache is filled with random K/V
rather than prefilled: a decode step computes over every slot of the cache whatever it holds, so
only the capacity matters, and a real 128K prefill would only add minutes.

Variants (rows): `donated` (state and cache donated to the step, as the streaming path does),
`no_donation` (plain `jax.jit(sleep_jax.wake)`: every step copies the cache), and, where the
compute dtype is not float32, `bf16_weights` (donated, with `sleep_jax.inference_params`: the
weights the model casts to the compute dtype cast once instead of inside every step, which is
what `Stream` computes with; results are bit-identical). Each timed call includes dispatch, as
a real decode loop does. A PNG plots latency against context. Run from the repository root:

    python -m benchmarks.wake_latency                        # GPU sizes on a GPU, small on CPU
    python -m benchmarks.wake_latency --contexts=1024,131072 --runs=50
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sleep_jax
from sleep_jax.model import Params
from sleep_jax.streaming import Stream

from benchmarks import common

VARIANTS = ("donated", "no_donation", "bf16_weights")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--contexts", help="tokens seen before the timed steps, increasing "
                      "(default GPU 1024,4096,16384,65536,131072; CPU 32,128,512,2048,4096)")
  parser.add_argument("--d_model", type=int, help="width (default GPU 2048, CPU 128)")
  parser.add_argument("--heads", type=int, help="heads (default GPU 16, CPU 4)")
  parser.add_argument("--layout", help="sleep model blocks (default GPU AGAGAGAG, CPU AGAG)")
  parser.add_argument("--window", type=int, help="L (default GPU 2048, CPU 64)")
  parser.add_argument("--eviction", choices=("hard", "sliding"), default="hard")
  parser.add_argument("--n", type=int, default=4, help="sleep passes per boundary while streaming")
  parser.add_argument("--vocab", type=int, help="vocabulary (default GPU 32768, CPU 256)")
  parser.add_argument("--batch", type=int, default=1, help="streams decoded together")
  parser.add_argument("--variants", help=f"comma-separated among {VARIANTS} (default all that "
                      "apply; bf16_weights only where the compute dtype is not float32)")
  parser.add_argument("--plot", default=None,
                      help="PNG path (default next to the JSON, wake_latency_<backend>.png)")
  common.add_common_flags(parser, runs=20, warmup=3)
  args = parser.parse_args(argv)
  common.check_common_flags(args)
  small = common.quick(args)
  args.contexts = common.int_list(
      "--contexts", args.contexts,
      (32, 128, 512, 2048, 4096) if small else (1024, 4096, 16384, 65536, 131072))
  if list(args.contexts) != sorted(set(args.contexts)):
    raise ValueError(f"--contexts must be strictly increasing, got {args.contexts}")
  args.d_model = common.check_int("--d_model", args.d_model or (128 if small else 2048), 1)
  args.heads = common.check_int("--heads", args.heads or (4 if small else 16), 1)
  args.layout = args.layout or ("AGAG" if small else "AGAGAGAG")
  args.window = common.check_int("--window", args.window or (64 if small else 2048), 2)
  args.vocab = common.check_int("--vocab", args.vocab or (256 if small else 32768), 2)
  common.check_int("--n", args.n, 1)
  common.check_int("--batch", args.batch, 1)
  args.variants = common.str_list("--variants", args.variants, VARIANTS, VARIANTS)
  return args


def expected_fill(config, context: int) -> int:
  """Window-cache slots in use after streaming `context` tokens (boundaries at multiples of L)."""
  L = config.window
  if config.eviction == "sliding" and context >= L:
    return L - 1 + context % L
  return context % L


def stream_to(stream: Stream, context: int, rng: np.random.Generator, vocab: int,
              chunk: int) -> None:
  """Feeds random tokens until the stream has seen `context` tokens, in pieces of at most `chunk`
  tokens that never cross a window boundary (the stream sleeps at each boundary)."""
  L = stream.params.config.window
  while stream.tokens_seen < context:
    take = min(context - stream.tokens_seen, L - stream.position, chunk)
    tokens = rng.integers(1, vocab, size=(stream.batch_size, take), dtype=np.int32)
    stream.feed(tokens)
  jax.block_until_ready(stream.state)


def feed_chunk(window: int, contexts: Sequence[int]) -> int:
  """One piece size that reaches every context and window end exactly (one compiled shape), if it
  is not too small; else the window."""
  size = math.gcd(window, *contexts)
  return size if size >= max(1, window // 8) else window


def filled_cache(params: Params, batch: int, capacity: int, length: int,
                 key) -> sleep_jax.WindowCache:
  """A full-attention KV cache of `capacity` slots whose first `length` hold random K/V."""
  cache = sleep_jax.init_cache(params, batch, capacity)
  layers = []
  for i, layer in enumerate(cache.layers):
    layers.append({name: jax.random.normal(jax.random.fold_in(key, 2 * i + j), buf.shape, buf.dtype)
                   for j, (name, buf) in enumerate(sorted(layer.items()))})
  return cache.replace(layers=tuple(layers), length=jnp.asarray(length, jnp.int32))


def step_fns():
  wake = sleep_jax.wake
  return {"donated": jax.jit(wake, donate_argnums=(1, 2)), "no_donation": jax.jit(wake),
          "bf16_weights": jax.jit(wake, donate_argnums=(1, 2))}


def _stepper(compiled, params):
  """A `time_chain` step: carry (logits, state, cache) -> the next token's."""

  def step(carry, tokens):
    _, state, cache = carry
    return compiled(params, state, cache, tokens)

  return step


COLUMNS = (("context", "context", "d"), ("fill", "sleep fill", "d"),
           ("sleep_donated", "sleep us", ".1f"), ("full_donated", "full-attn us", ".1f"),
           ("full_over_sleep", "full/sleep", ".2f"), ("sleep_min", "sleep min us", ".1f"),
           ("full_min", "full min us", ".1f"),
           ("sleep_no_donation", "sleep no-donate us", ".1f"),
           ("full_no_donation", "full no-donate us", ".1f"),
           ("sleep_bf16_weights", "sleep bf16-w us", ".1f"),
           ("full_bf16_weights", "full bf16-w us", ".1f"))


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  results = common.Results("wake_latency", args)
  print(common.header_line("wake_latency"))
  cfg = sleep_jax.ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
                              layout=args.layout, window=args.window, eviction=args.eviction)
  full_cfg = cfg.replace(layout="A" * len(args.layout), eviction="none")
  variants = [v for v in args.variants
              if v != "bf16_weights" or cfg.compute_dtype != jnp.float32]
  steps = args.warmup + args.runs
  capacity = cfg.cache_capacity
  for c in args.contexts:
    if expected_fill(cfg, c) + steps > capacity:
      raise ValueError(
          f"--warmup + --runs = {steps} steps do not fit the window cache after {c} tokens "
          f"({expected_fill(cfg, c)} of {capacity} slots in use): lower --runs, or pick "
          "--contexts whose remainder modulo --window leaves room")
    if c < 1:
      raise ValueError(f"--contexts must be >= 1, got {c}")
  print(f"sleep model: {cfg.layout} d={cfg.d_model} heads={cfg.num_heads}x"
        f"{cfg.resolved_head_dim} L={cfg.window} {cfg.eviction} n={args.n} batch={args.batch} "
        f"dtype={cfg.compute_dtype.name}; full attention: {full_cfg.layout}; {steps} steps/row")

  key = jax.random.key(args.seed)
  params = {"sleep": sleep_jax.init(cfg, jax.random.fold_in(key, 0)),
            "full": sleep_jax.init(full_cfg, jax.random.fold_in(key, 1))}
  weights = {(m, v): (sleep_jax.inference_params(p) if v == "bf16_weights" else p)
             for m, p in params.items() for v in variants}
  b = args.batch
  tokens_abs = jax.ShapeDtypeStruct((b, 1), jnp.int32)

  # Compile every step up front (shapes only), several at once.
  fns = step_fns()
  jobs = {}
  sleep_state = sleep_jax.init_state(params["sleep"], b)
  sleep_cache = sleep_jax.init_cache(params["sleep"], b)
  for v in variants:
    jobs[("sleep", v, 0)] = (fns[v], (weights[("sleep", v)], sleep_state,
                                      common.abstract(sleep_cache), tokens_abs))
  full_state = sleep_jax.init_state(params["full"], b)
  for c in args.contexts:
    cache_abs = jax.eval_shape(lambda c=c: sleep_jax.init_cache(params["full"], b, c + steps))
    for v in variants:
      jobs[("full", v, c)] = (fns[v], (weights[("full", v)], full_state, cache_abs, tokens_abs))
  compiled = common.compile_all(jobs, args.compile_threads)

  rng = np.random.default_rng(args.seed)
  token_sets = common.random_tokens(rng, (b, 1), args.vocab, 8)
  # 1. Stream the sleep model through every context, keeping a copy of its state and cache.
  stream = Stream(params["sleep"], b, args.n)
  start = time.perf_counter()
  snapshots = {}
  chunk = feed_chunk(args.window, args.contexts)
  for c in args.contexts:
    stream_to(stream, c, rng, args.vocab, chunk)
    fill = int(stream.cache.length)
    assert fill == expected_fill(cfg, c), (fill, c)
    snapshots[c] = dict(state=jax.tree.map(jnp.copy, stream.state),
                        cache=jax.tree.map(jnp.copy, stream.cache), cache_fill=fill,
                        tokens_streamed=stream.tokens_seen, windows_slept=stream.windows_slept)
  stream_s = time.perf_counter() - start
  print(f"streamed {stream.tokens_seen} tokens in pieces of {chunk} through "
        f"{stream.windows_slept} boundaries in {stream_s:.1f} s")

  # 2. The sleep model: every context and variant, one step of each in turn, so that the
  # comparison across contexts shares whatever else the machine is doing.
  chains, labels = [], []
  for c, snap in snapshots.items():
    for v in variants:
      fn = compiled[("sleep", v, 0)]
      state, cache = jax.tree.map(jnp.copy, (snap["state"], snap["cache"]))
      chains.append((_stepper(fn, weights[("sleep", v)]), (None, state, cache)))
      labels.append(dict(model="sleep", variant=v, context=c, cache_fill=snap["cache_fill"],
                         cache_capacity=capacity, tokens_streamed=snap["tokens_streamed"],
                         windows_slept=snap["windows_slept"], compile_s=fn.compile_s))
  timings = common.time_interleaved(chains, token_sets, runs=args.runs, warmup=args.warmup)
  for label, timing in zip(labels, timings):
    results.add(dict(label, **timing.summary("us")))
  del chains, snapshots

  # 3. The full-attention model: one context at a time (its caches are large), variants in turn.
  def time_full(c, group):
    chains, labels = [], []
    for v in group:
      fn = compiled[("full", v, c)]
      cache = filled_cache(params["full"], b, c + steps, c, jax.random.fold_in(key, c))
      chains.append((_stepper(fn, weights[("full", v)]), (None, full_state, cache)))
      labels.append(dict(model="full_attention", variant=v, context=c, cache_fill=c,
                         cache_capacity=c + steps, compile_s=fn.compile_s))
    timings = common.time_interleaved(chains, token_sets, runs=args.runs, warmup=args.warmup)
    return [dict(label, **t.summary("us")) for label, t in zip(labels, timings)]

  for c in args.contexts:
    try:
      rows = time_full(c, variants)
    except Exception:  # e.g. out of memory with several long caches alive: one at a time
      rows = []
      for v in variants:
        try:
          rows += time_full(c, [v])
        except Exception as err:
          rows.append(dict(model="full_attention", variant=v, context=c,
                           note="failed: " + common.describe_error(err, 160)))
    for row in rows:
      results.add(row)
    print(f"full attention at {c}: " + ", ".join(
        f"{r['variant']} {r.get('median_us', float('nan')):.1f} us" for r in rows))

  # The public streaming path at the largest context: Stream.feed one token at a time.
  feed_times = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(stream.feed(token_sets[i % len(token_sets)]))
    if i >= args.warmup:
      feed_times.append(time.perf_counter() - start)
  results.summary["stream_feed_us_at_largest_context"] = 1e6 * common.Timing(feed_times).median_s
  results.summary.update(summarise(results.rows, args.contexts))
  results.summary["streaming_s"] = stream_s
  results.write()

  table = pivot(results.rows, args.contexts)
  print(common.format_table(table, COLUMNS))
  for name, value in results.summary.items():
    print(f"  {name}: {value:.3g}" if isinstance(value, float) else f"  {name}: {value}")
  png = args.plot or os.path.splitext(results.path)[0] + ".png"
  if plot(results.rows, png, cfg, full_cfg, args.batch):
    print(f"wrote {png}")
  print(f"wrote {results.path}")
  return results


def _median(rows, model, variant, context, key="median_us"):
  for r in rows:
    if (r["model"], r["variant"], r["context"]) == (model, variant, context):
      return r.get(key)
  return None


def pivot(rows: list[dict], contexts: Sequence[int]) -> list[dict]:
  table = []
  for c in contexts:
    fill = next((r["cache_fill"] for r in rows if r["model"] == "sleep" and r["context"] == c),
                None)
    entry = {"context": c, "fill": fill}
    for model, short in (("sleep", "sleep"), ("full_attention", "full")):
      for v in VARIANTS:
        entry[f"{short}_{v}"] = _median(rows, model, v, c)
    entry["full_over_sleep"] = common.ratio(entry["full_donated"], entry["sleep_donated"])
    entry["sleep_min"] = _median(rows, "sleep", "donated", c, "min_us")
    entry["full_min"] = _median(rows, "full_attention", "donated", c, "min_us")
    table.append(entry)
  return table


def summarise(rows: list[dict], contexts: Sequence[int]) -> dict:
  """The two wake goals (docs/performance.md) at the smallest and largest context measured,
  for the plain donated step; the same two ratios with weights cast once (`bf16_weights`, both
  models) where that variant ran."""
  lo, hi = contexts[0], contexts[-1]
  sleep_lo, sleep_hi = _median(rows, "sleep", "donated", lo), _median(rows, "sleep", "donated", hi)
  full_hi = _median(rows, "full_attention", "donated", hi)
  flat = common.ratio(sleep_hi, sleep_lo)
  speedup = common.ratio(full_hi, sleep_hi)
  summary = {
      f"sleep_latency_{hi}_over_{lo}": flat,
      f"goal_sleep_latency_{hi}_within_10pct_of_{lo}": None if flat is None else flat <= 1.10,
      f"full_attention_over_sleep_at_{hi}": speedup,
      f"goal_sleep_5x_faster_than_full_attention_at_{hi}": (
          None if speedup is None else speedup >= 5),
  }
  cast_hi = _median(rows, "sleep", "bf16_weights", hi)
  if cast_hi is not None:
    summary[f"bf16_weights_sleep_latency_{hi}_over_{lo}"] = common.ratio(
        cast_hi, _median(rows, "sleep", "bf16_weights", lo))
    summary[f"bf16_weights_full_attention_over_sleep_at_{hi}"] = common.ratio(
        _median(rows, "full_attention", "bf16_weights", hi), cast_hi)
  return summary


def plot(rows: list[dict], path: str, cfg, full_cfg, batch: int) -> bool:
  """Latency vs context, one line per model and variant. False when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no plot (the JSON has every number)")
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  styles = {"donated": "-", "no_donation": "--", "bf16_weights": ":"}
  colors = {"sleep": "tab:blue", "full_attention": "tab:red"}
  names = {"sleep": f"sleep model ({cfg.layout}, L={cfg.window})",
           "full_attention": f"full attention ({full_cfg.layout})"}
  for model in ("sleep", "full_attention"):
    for v in VARIANTS:
      pts = sorted((r["context"], r["median_us"]) for r in rows
                   if r["model"] == model and r["variant"] == v and "median_us" in r)
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, styles[v], color=colors[model], marker="o", ms=3,
                label=f"{names[model]}, {v.replace('_', ' ')}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("tokens of context before the step")
  ax.set_ylabel("wake step latency, median (us)")
  ax.set_title(f"Per-token wake latency ({common.device_kind()}, batch {batch})", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


if __name__ == "__main__":
  main(sys.argv[1:])
