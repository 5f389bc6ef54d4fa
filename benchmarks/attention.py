"""Times the model's attention op: `jax.nn.dot_product_attention`, full causal vs sliding window.

Rows: implementation (`xla`; `cudnn` where the GPU supports it; `splash`, the TPU kernel of
`sleep_jax.attention.splash_attention`, default on a TPU, in the slow Pallas interpreter
elsewhere) x mask x T x mode.

* `causal`: `is_causal=True` over T tokens (the model's path when it attends over a whole window
  without a cache, and the full-attention baseline);
* `sliding`: `is_causal=True, local_window_size=(L - 1, 0)`: every query sees itself and the
  L - 1 tokens before it;
* `sliding_mask`: the same attention pattern as an explicit boolean mask, the way the model's
  window-cache path in `sleep_jax/layers.py` builds it for cuDNN and for windows too small for
  blocks, to show what the mask costs (no `splash` row: that kernel takes static masks only).

A second table (`attention_blocks_<backend>.json`) times the model's sliding-window shapes with
one masked call against `sleep_jax.attention.sliding_window_attention` (blocks of queries, each
scoring only the key slots its window reaches), per window L of `--block_windows`:

* `pass_*`: a window pass behind a sliding cache: t = L queries at slots L - 1 .. 2L - 2 of the
  2L - 1 slots (the cache length is a traced argument, as in the model);
* `decode_*`: one query at the cache's last slot, 2L - 1 slots (forward only);
* `long_*`: no cache, T = 4L tokens: `local_window_size` (`long_local`) against blocks.

With `--model_windows`, a third table (`attention_model_<backend>.json`) times a small sliding
model (`--model_d`, `--model_layout`) both ways, compiled in one process:
`sleep_jax.sleep_window` with one pass behind a cache of L - 1 slots (`window_pass`), and the
value and gradient of `sleep_jax.loss` over two windows, the first slept on with one pass
(`loss_grad`).

The rows of one T are timed in turn, one call of each (interleaved), so background load hits them
alike. FLOPs count the query-key pairs that are visible: `4 D` per pair and head for the forward
pass (scores and values), forward+backward counted as 3 forwards (a fused kernel that recomputes
the scores in the backward pass does more work than that). Run from the repository root:

    python -m benchmarks.attention                           # GPU sizes on a GPU, small on CPU
    python -m benchmarks.attention --seq_lens=1024,4096 --impls=cudnn --modes=fwd
    python -m benchmarks.attention --seq_lens=256 --block_windows=512,1024 --batch=2
    python -m benchmarks.attention --seq_lens=256 --block_windows=none --model_windows=512,1024
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sleep_jax
from sleep_jax import attention as attention_lib

from benchmarks import common

IMPLS = ("xla", "cudnn", "splash")
MASKS = ("causal", "sliding", "sliding_mask")
MODES = ("fwd", "fwdbwd")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq_lens", help="T values (default GPU 1024..16384, CPU 256,512,1024)")
  parser.add_argument("--window", type=int,
                      help="L of the sliding window (default GPU 2048, CPU 128)")
  parser.add_argument("--batch", type=int, help="B (default GPU 4, CPU 1)")
  parser.add_argument("--heads", type=int, help="H (default GPU 16, CPU 4)")
  parser.add_argument("--head_dim", type=int, help="D (default GPU 128, CPU 64)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="input dtype (default bfloat16 on accelerators, float32 on CPU)")
  parser.add_argument("--impls", help=f"comma-separated among {IMPLS} (default GPU xla,cudnn; "
                      "TPU xla,splash; CPU xla)")
  parser.add_argument("--masks", help=f"comma-separated among {MASKS} (default all)")
  parser.add_argument("--modes", help=f"comma-separated among {MODES} (default both)")
  parser.add_argument("--block_windows",
                      help="L values of the blocked-attention table; 'none' skips it (default "
                      "--window; on the CPU without --window 256,512,1024)")
  parser.add_argument("--model_windows",
                      help="L values of the model table (default: no model table)")
  parser.add_argument("--model_d", type=int, default=256,
                      help="d_model of the model table (default %(default)s)")
  parser.add_argument("--model_layout", default="AGAG",
                      help="block layout of the model table (default %(default)s)")
  parser.add_argument("--xla_max_gib", type=float, default=8.0,
                      help="skip xla rows whose float32 score tensor B*H*T*T*4 bytes exceeds "
                      "this many GiB (x3 for fwdbwd) (default %(default)s)")
  common.add_common_flags(parser, runs=10)
  args = parser.parse_args(argv)
  common.check_common_flags(args)
  small = common.quick(args)
  args.seq_lens = common.int_list("--seq_lens", args.seq_lens,
                                  (256, 512, 1024) if small else (1024, 2048, 4096, 8192, 16384))
  window_given = args.window is not None
  args.window = common.check_int("--window", args.window or (128 if small else 2048), 1)
  args.batch = common.check_int("--batch", args.batch or (1 if small else 4), 1)
  args.heads = common.check_int("--heads", args.heads or (4 if small else 16), 1)
  args.head_dim = common.check_int("--head_dim", args.head_dim or (64 if small else 128), 1)
  args.dtype = args.dtype or ("bfloat16" if common.is_accelerator() else "float32")
  if args.block_windows == "none":
    args.block_windows = ()
  else:
    default = (args.window,) if window_given or not small else (256, 512, 1024)
    args.block_windows = common.int_list("--block_windows", args.block_windows, default)
  args.model_windows = common.int_list("--model_windows", args.model_windows, ())
  args.model_d = common.check_int("--model_d", args.model_d, 1)
  default_impls = {"gpu": ("xla", "cudnn"), "tpu": ("xla", "splash")}.get(common.backend(),
                                                                          ("xla",))
  args.impls = common.str_list("--impls", args.impls, default_impls, IMPLS)
  args.masks = common.str_list("--masks", args.masks, MASKS, MASKS)
  args.modes = common.str_list("--modes", args.modes, MODES, MODES)
  if args.xla_max_gib <= 0:
    raise ValueError(f"--xla_max_gib must be > 0, got {args.xla_max_gib}")
  return args


def attention_fn(impl: str, mask: str, window: int):
  """q, k, v [b t h d] -> [b t h d] for one of the MASKS."""

  def attend(q, k, v):
    if impl == "splash":
      return attention_lib.splash_attention(q, k, v, window=None if mask == "causal" else window)
    if mask == "causal":
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    if mask == "sliding":
      return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                          local_window_size=(window - 1, 0), implementation=impl)
    pos = jnp.arange(q.shape[1])
    visible = attention_lib.sliding_window_mask(pos, pos, window)
    # As the model calls it (cuDNN: odd lengths padded to even).
    return attention_lib.masked_attention(q, k, v, visible, implementation=impl)

  return attend


def build(impl: str, mask: str, mode: str, window: int):
  attend = attention_fn(impl, mask, window)
  if mode == "fwd":
    return jax.jit(attend)

  def functional(q, k, v, cotangent):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent)

  return jax.jit(jax.grad(functional, argnums=(0, 1, 2)))


def time_rows(fns: dict, sets: list, args) -> dict:
  """Times every compiled row of one T, one call of each in turn; rows that fail (e.g. out of
  memory with the others' outputs alive) are retried alone. Maps key -> Timing or exception."""

  def step(key, fn):
    used = slice(None) if key[2] == "fwdbwd" else slice(0, 3)
    return lambda carry, i: fn(*sets[i][used])

  keys = list(fns)
  indices = list(range(len(sets)))
  try:
    timings = common.time_interleaved([(step(k, fns[k]), None) for k in keys], indices,
                                      runs=args.runs, warmup=args.warmup)
    return dict(zip(keys, timings))
  except Exception:  # pylint: disable=broad-except
    out = {}
    for k in keys:
      try:
        out[k] = common.time_interleaved([(step(k, fns[k]), None)], indices, runs=args.runs,
                                         warmup=args.warmup)[0]
      except Exception as err:  # pylint: disable=broad-except
        out[k] = err
    return out


def pairs_for(mask: str, t: int, window: int) -> int:
  if mask == "causal":
    return common.attention_pairs(t)
  return common.attention_pairs(t, window=window)


COLUMNS = (("impl", "impl", ""), ("mask", "mask", ""), ("mode", "mode", ""), ("T", "T", "d"),
           ("median_ms", "median ms", ".3f"), ("min_ms", "min ms", ".3f"),
           ("tflops_per_s", "TFLOP/s", ".3g"), ("compile_s", "compile s", ".1f"),
           ("note", "note", ""))


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  results = common.Results("attention", args)
  print(common.header_line("attention"))
  b, h, d, L = args.batch, args.heads, args.head_dim, args.window
  dtype = jnp.dtype(args.dtype)
  print(f"B={b} H={h} D={d} L={L} dtype={args.dtype}")
  rng = np.random.default_rng(args.seed)
  for t in args.seq_lens:
    sets = []
    for _ in range(2):
      q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for _ in range(3))
      cot = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
      sets.append((q, k, v, cot))
    jobs, rows = {}, {}
    for impl in args.impls:
      for mask in args.masks:
        for mode in args.modes:
          key = (impl, mask, mode)
          row = {"impl": impl, "mask": mask, "mode": mode, "T": t, "B": b, "H": h, "D": d,
                 "window": L, "dtype": args.dtype}
          score_gib = b * h * t * t * 4 * (3 if mode == "fwdbwd" else 1) / 2 ** 30
          if impl == "xla" and score_gib > args.xla_max_gib:
            row["note"] = f"skipped: {score_gib:.0f} GiB of scores > --xla_max_gib"
          elif impl == "splash" and mask == "sliding_mask":
            row["note"] = "not applicable: splash takes static masks (the sliding row)"
          else:
            fn_args = sets[0] if mode == "fwdbwd" else sets[0][:3]
            jobs[key] = (build(impl, mask, mode, L), fn_args)
          rows[key] = row
    compiled = common.compile_many(jobs, args.compile_threads)
    runnable = {}
    for key, row in rows.items():
      fn = compiled.get(key)
      if isinstance(fn, Exception):
        row["note"] = "unavailable: " + common.describe_error(fn, 160)
      elif fn is not None:
        runnable[key] = fn
    timings = time_rows(runnable, sets, args)
    for key, row in rows.items():
      timing = timings.get(key)
      if isinstance(timing, Exception):
        row["note"] = "failed: " + common.describe_error(timing, 160)
      elif timing is not None:
        fn = runnable[key]
        flops = 4 * d * h * b * pairs_for(row["mask"], t, L) * (
            3 if row["mode"] == "fwdbwd" else 1)
        row.update(timing.summary("ms"), flops=flops,
                   tflops_per_s=flops / timing.median_s / 1e12, compile_s=fn.compile_s,
                   temp_bytes=fn.temp_bytes)
      results.add(row)
    print(common.format_table([r for r in results.rows if r["T"] == t], COLUMNS))

  results.summary["speedups"] = speedups(results.rows)
  results.write()
  print("\nspeedups (time of the first / time of the second)")
  print(common.format_table(results.summary["speedups"], SPEEDUP_COLUMNS))
  print(f"wrote {results.path}")
  if args.block_windows:
    blocked_table(args)
  if args.model_windows:
    model_table(args)
  return results


SPEEDUP_COLUMNS = (("T", "T", "d"), ("mode", "mode", ""), ("what", "comparison", ""),
                   ("speedup", "x", ".2f"))

# ----------------------------------------------------------------------------- blocks

BLOCK_COLUMNS = (("impl", "impl", ""), ("mask", "path", ""), ("mode", "mode", ""),
                 ("window", "L", "d"), ("T", "queries", "d"), ("slots", "slots", "d"),
                 ("block", "block", "d"), ("scores", "scores/head", "d"),
                 ("median_ms", "median ms", ".3f"), ("min_ms", "min ms", ".3f"),
                 ("compile_s", "compile s", ".1f"), ("note", "note", ""))


def block_shapes(window: int) -> dict:
  """shape -> (queries t, key slots c, slot of the first query) for a window of L."""
  return {"pass": (window, 2 * window - 1, window - 1), "decode": (1, 2 * window - 1,
                                                                    2 * window - 2),
          "long": (4 * window, 4 * window, 0)}


def block_fn(impl: str, path: str, window: int):
  """(q, k, v, q_start) -> [b t h d] for one row of the blocked-attention table."""

  def attend(q, k, v, q_start):
    if path == "blocks":
      return attention_lib.sliding_window_attention(q, k, v, window=window, q_start=q_start,
                                                    implementation=impl)
    if path == "local":
      return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                          local_window_size=(window - 1, 0), implementation=impl)
    visible = attention_lib.sliding_window_mask(q_start + jnp.arange(q.shape[1]),
                                                jnp.arange(k.shape[1]), window)
    return attention_lib.masked_attention(q, k, v, visible, implementation=impl)

  return attend


def build_block_row(impl: str, path: str, mode: str, window: int):
  attend = block_fn(impl, path, window)
  if mode == "fwd":
    return jax.jit(attend)

  def functional(q, k, v, q_start, cotangent):
    return jnp.sum(attend(q, k, v, q_start).astype(jnp.float32) * cotangent)

  return jax.jit(jax.grad(functional, argnums=(0, 1, 2)))


def blocked_table(args) -> common.Results:
  """Times one masked call against blocks of queries on the model's sliding-window shapes."""
  results = common.Results("attention_blocks", args)
  b, h, d = args.batch, args.heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(args.seed + 1)
  print(f"\nsliding windows by blocks of queries: B={b} H={h} D={d} dtype={args.dtype}")
  for window in args.block_windows:
    for shape, (t, c, first) in block_shapes(window).items():
      sets = []
      for _ in range(2):
        q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
        k, v = (jnp.asarray(rng.standard_normal((b, c, h, d)), dtype) for _ in range(2))
        cot = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
        sets.append((q, k, v, jnp.int32(first), cot))
      n = attention_lib.block_size(t, window)
      paths = ("local", "blocks") if shape == "long" else ("mask", "blocks")
      modes = ("fwd",) if shape == "decode" else args.modes
      jobs, rows = {}, {}
      for impl in args.impls:
        for path in paths:
          for mode in modes:
            key = (impl, path, mode)
            rows[key] = {"impl": impl, "mask": f"{shape}_{path}", "mode": mode, "window": window,
                         "T": t, "slots": c, "first_slot": first, "B": b, "H": h, "D": d,
                         "dtype": args.dtype, "block": n if path == "blocks" else None,
                         "scores": t * (n + window - 1) if path == "blocks" else t * c}
            score_gib = b * h * rows[key]["scores"] * 4 * (3 if mode == "fwdbwd" else 1) / 2**30
            if impl == "xla" and score_gib > args.xla_max_gib:
              rows[key]["note"] = f"skipped: {score_gib:.0f} GiB of scores > --xla_max_gib"
              continue
            used = sets[0] if mode == "fwdbwd" else sets[0][:4]
            jobs[key] = (build_block_row(impl, path, mode, window), used)
      compiled = common.compile_many(jobs, args.compile_threads)
      runnable = {}
      for key, fn in compiled.items():
        if isinstance(fn, Exception):
          rows[key]["note"] = "unavailable: " + common.describe_error(fn, 160)
        else:
          runnable[key] = fn

      def step(key, fn):
        used = slice(None) if key[2] == "fwdbwd" else slice(0, 4)
        return lambda carry, i: fn(*sets[i][used])

      try:
        timings = common.time_interleaved([(step(k, f), None) for k, f in runnable.items()],
                                          list(range(len(sets))), runs=args.runs,
                                          warmup=args.warmup) if runnable else []
      except Exception as err:  # pylint: disable=broad-except
        for key in runnable:  # e.g. out of memory: keep the rows, say why they have no time
          rows[key]["note"] = "failed: " + common.describe_error(err, 160)
        runnable, timings = {}, []
      for (key, fn), timing in zip(runnable.items(), timings):
        rows[key].update(timing.summary("ms"), compile_s=fn.compile_s, temp_bytes=fn.temp_bytes)
      for row in rows.values():
        results.add(row)
    print(common.format_table([r for r in results.rows if r["window"] == window], BLOCK_COLUMNS))
  results.summary["speedups"] = block_speedups(results.rows)
  results.write()
  print("\nspeedups of blocks (time of one masked call / time of blocks; long: of "
        "local_window_size)")
  print(common.format_table(results.summary["speedups"], SPEEDUP_COLUMNS))
  print(f"wrote {results.path}")
  return results


def block_speedups(rows: list[dict]) -> list[dict]:
  timed = {(r["impl"], r["mask"], r["mode"], r["window"]): r for r in rows if "median_ms" in r}
  out = []
  for (impl, mask, mode, window), row in timed.items():
    shape, path = mask.rsplit("_", 1)
    if path != "blocks":
      continue
    for base in ("mask", "local"):
      other = timed.get((impl, f"{shape}_{base}", mode, window))
      if other is not None:
        out.append({"T": row["T"], "mode": mode, "window": window,
                    "what": f"{impl} L={window} {shape}: {base} / blocks",
                    "speedup": other["median_ms"] / row["median_ms"]})
  return out


def speedups(rows: list[dict]) -> list[dict]:
  """causal over sliding per implementation, and xla over cudnn (or splash) per mask."""
  timed = {(r["impl"], r["mask"], r["mode"], r["T"]): r["median_ms"]
           for r in rows if "median_ms" in r}
  out = []
  for (impl, mask, mode, t), ms in sorted(timed.items(), key=lambda kv: (kv[0][3], kv[0][2])):
    if mask == "sliding" and (impl, "causal", mode, t) in timed:
      out.append({"T": t, "mode": mode, "what": f"{impl}: causal / sliding",
                  "speedup": timed[(impl, "causal", mode, t)] / ms})
    if mask == "sliding" and (impl, "sliding_mask", mode, t) in timed:
      out.append({"T": t, "mode": mode, "what": f"{impl}: sliding_mask / sliding",
                  "speedup": timed[(impl, "sliding_mask", mode, t)] / ms})
    if impl in ("cudnn", "splash") and ("xla", mask, mode, t) in timed:
      out.append({"T": t, "mode": mode, "what": f"{mask}: xla / {impl}",
                  "speedup": timed[("xla", mask, mode, t)] / ms})
  return out



# ----------------------------------------------------------------------------- model

MODEL_COLUMNS = (("mask", "path", ""), ("mode", "what", ""), ("window", "L", "d"),
                 ("median_ms", "median ms", ".3f"), ("min_ms", "min ms", ".3f"),
                 ("compile_s", "compile s", ".1f"))


def model_table(args) -> common.Results:
  """A small sliding model, blocks against one masked call, both compiled in this process."""
  results = common.Results("attention_model", args)
  b = args.batch
  print(f"\nsliding model: d_model={args.model_d} layout={args.model_layout} heads={args.heads} "
        f"B={b}")
  rng = np.random.default_rng(args.seed + 2)
  for window in args.model_windows:
    cfg = sleep_jax.ModelConfig(vocab_size=256, d_model=args.model_d, num_heads=args.heads,
                                layout=args.model_layout, window=window, eviction="sliding",
                                dtype=args.dtype)
    params = sleep_jax.init(cfg, jax.random.key(args.seed))
    batch_sets = []
    for _ in range(2):
      tokens = jnp.asarray(rng.integers(1, 256, (b, 2 * window)), jnp.int32)
      batch_sets.append({"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
                         "loss_mask": jnp.zeros((b, 2 * window), bool).at[:, window:].set(True)})
    # A real cache of L - 1 slots: the first window slept on, then evicted.
    state0 = sleep_jax.init_state(params, b)
    _, cache = sleep_jax.sleep_window(params, state0, sleep_jax.init_cache(params, b),
                                      batch_sets[0]["tokens"][:, :window], 1)
    compiled = {}
    # The path is chosen when a function is traced: compile one, clear the caches, compile the
    # other; compiled executables stay valid.
    for path in ("blocks", "mask"):
      jax.clear_caches()
      with (attention_lib.force_dense_masks() if path == "mask" else contextlib.nullcontext()):
        jobs = {(path, what): (fn, fn_args) for what, (fn, fn_args) in
                _model_jobs(params, state0, cache, batch_sets, window).items()}
        compiled.update(common.compile_all(jobs, args.compile_threads))
    jax.clear_caches()

    def step(key, fn):
      what = key[1]

      def call(carry, i):
        if what == "window_pass":
          return fn(params, state0, cache, batch_sets[i]["tokens"][:, window:])
        return fn(params, batch_sets[i])

      return call

    timings = common.time_interleaved([(step(k, f), None) for k, f in compiled.items()],
                                      [0, 1], runs=args.runs, warmup=args.warmup)
    for (key, fn), timing in zip(compiled.items(), timings):
      results.add({"impl": "xla", "mask": key[0], "mode": key[1], "window": window,
                   "T": window, "B": b, "d_model": args.model_d, "heads": args.heads,
                   "layout": args.model_layout,
                   **timing.summary("ms"), "compile_s": fn.compile_s})
    print(common.format_table([r for r in results.rows if r["window"] == window],
                              MODEL_COLUMNS))
  timed = {(r["mask"], r["mode"], r["window"]): r["median_ms"] for r in results.rows}
  results.summary["speedups"] = [
      {"T": window, "mode": what, "what": f"L={window} {what}: mask / blocks",
       "speedup": timed[("mask", what, window)] / ms}
      for (path, what, window), ms in timed.items() if path == "blocks"]
  results.write()
  print(common.format_table(results.summary["speedups"], SPEEDUP_COLUMNS))
  print(f"wrote {results.path}")
  return results


def _model_jobs(params, state, cache, batch_sets, window):
  window_pass = jax.jit(lambda p, s, c, x: sleep_jax.sleep_window(p, s, c, x, 1))
  loss_grad = jax.jit(jax.value_and_grad(
      lambda p, b: sleep_jax.loss(p, b, 1, consolidation_windows=(True, False))[0]))
  return {"window_pass": (window_pass, (params, state, cache,
                                        batch_sets[0]["tokens"][:, window:])),
          "loss_grad": (loss_grad, (params, batch_sets[0]))}


if __name__ == "__main__":
  main(sys.argv[1:])
