"""Where the time of one call goes: a profiler trace of a compiled function, summed per kernel.

The tables time whole calls; this says what bounds one (docs/performance.md, "What bounds it"):
the device's own work, or the gaps between its kernels (launch and dispatch). Targets:

* `op`: `gated_delta_rule` at one shape (`--shape` BxTxHxD, `--impl`, `--mode`); default on an
  accelerator 4x16384x16x128 in bf16 with `pallas`, forward; on CPU 1x512x4x64, float32, chunked.
* `wake`: one-token `sleep_jax.wake` step of a sleep model, state and cache donated, each output
  fed back (the wake_latency benchmark's sleep model: `--d_model`, `--heads`, `--layout`,
  `--window`; default on an accelerator d = 1024, AGAG, 8 heads, L = 1024). Its cost does not
  depend on how long the stream has run (the cache has a fixed size), so it starts empty.
* `full`: the same step of the full-attention model of that width (every block "A", no
  eviction) behind a KV cache holding `--context` random tokens (default 131072; CPU 512).

After compilation and `--warmup` calls, `--runs` calls run inside `jax.profiler.trace`; the
trace JSON (Chrome trace format) it writes is read back, and its complete events are grouped by
line (process, thread). The kernel lines are the device's
`Stream ...` lines (a GPU's kernels and copies); without them, the other lines of a `/device:`
process; without a device process (CPU), the XLA client's threads. An event that encloses
another event of its line (a wrapper such as a `while` loop's) is not counted, nor XLA:CPU's
bookkeeping (its thunk executor waiting, markers of a thunk's end).

Printed per call: the host's wall time (median, each call blocking), each kernel line's events
and busy time (the union of its events' intervals; summed over lines, which can run at once, so
the sum can exceed the wall time), and the `--top` event names by time. Busy time far below the
wall time means the device idles between kernels: the call is bound by launch and dispatch, not
by the device's arithmetic or memory traffic.

    python -m benchmarks.profile --target=op --impl=chunked
    python -m benchmarks.profile --target=full --context=65536 --top=30
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

import sleep_jax
from sleep_jax.ops import gated_delta_rule

from benchmarks import common
from benchmarks import wake_latency

TARGETS = ("op", "wake", "full")
LINE_COLUMNS = (("process", "process", ""), ("line", "line", ""),
                ("events_per_call", "events/call", ".1f"),
                ("busy_us_per_call", "busy us/call", ".1f"))
TOP_COLUMNS = (("name", "event", ""), ("events_per_call", "per call", ".1f"),
               ("us_per_call", "us/call", ".1f"), ("mean_us", "mean us", ".2f"),
               ("share", "share", ".1%"))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--target", choices=TARGETS, default="op")
  parser.add_argument("--shape", help="op: BxTxHxD (default GPU/TPU 4x16384x16x128, CPU "
                      "1x512x4x64)")
  parser.add_argument("--impl", choices=("scan", "chunked", "pallas", "auto"),
                      help="op: implementation (default pallas on GPU/TPU, chunked on CPU)")
  parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd", help="op: mode")
  parser.add_argument("--d_model", type=int, help="wake/full: width (default GPU 1024, CPU 128)")
  parser.add_argument("--heads", type=int, help="wake/full: heads (default GPU 8, CPU 4)")
  parser.add_argument("--layout", help="wake: blocks of the sleep model (default AGAG)")
  parser.add_argument("--window", type=int, help="wake: L (default GPU 1024, CPU 64)")
  parser.add_argument("--vocab", type=int, help="wake/full: vocabulary (default GPU 32768, "
                      "CPU 256)")
  parser.add_argument("--context", type=int,
                      help="full: tokens in the KV cache (default GPU 131072, CPU 512)")
  parser.add_argument("--top", type=int, default=15, help="event names listed (default 15)")
  common.add_common_flags(parser, runs=10, warmup=3)
  args = parser.parse_args(argv)
  common.check_common_flags(args)
  small = common.quick(args)
  args.shape = common.op_shape("--shape", args.shape or ("1x512x4x64" if small
                                                        else "4x16384x16x128"))
  args.impl = args.impl or ("chunked" if small else "pallas")
  args.d_model = common.check_int("--d_model", args.d_model or (128 if small else 1024), 1)
  args.heads = common.check_int("--heads", args.heads or (4 if small else 8), 1)
  args.layout = args.layout or "AGAG"
  args.window = common.check_int("--window", args.window or (64 if small else 1024), 2)
  args.vocab = common.check_int("--vocab", args.vocab or (256 if small else 32768), 2)
  args.context = common.check_int("--context", args.context or (512 if small else 131072), 1)
  args.top = common.check_int("--top", args.top, 1)
  return args


# ----------------------------------------------------------------------------- targets


def op_target(args) -> tuple[Callable, Any, str]:
  """(step, carry, description): the op's step ignores its carry and returns its outputs."""
  b, t, h, d = args.shape
  dtype = jnp.float32 if not common.is_accelerator() else jnp.bfloat16
  keys = jax.random.split(jax.random.key(args.seed), 5)
  q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True)
          for x in (jax.random.normal(keys[i], (b, t, h, d)) for i in (0, 1)))
  v = jax.random.normal(keys[2], (b, t, h, d))
  beta = jax.random.uniform(keys[3], (b, t, h), minval=0.05, maxval=0.95)
  log_alpha = jax.random.uniform(keys[4], (b, t, h), minval=-1.0, maxval=-0.01)
  inputs = (q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, log_alpha)

  def forward(q, k, v, beta, log_alpha):
    return gated_delta_rule(q, k, v, beta, log_alpha, impl=args.impl, chunk_size=None)

  if args.mode == "fwd":
    fn = jax.jit(forward)
  else:
    def total(*xs):
      o, state = forward(*xs)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)
    fn = jax.jit(jax.grad(total, argnums=tuple(range(5))))
  compiled = fn.lower(*inputs).compile()
  return (lambda carry: compiled(*inputs)), None, (
      f"gated_delta_rule {args.mode} impl={args.impl} shape={'x'.join(map(str, args.shape))} "
      f"dtype={jnp.dtype(dtype).name}")


def step_target(args) -> tuple[Callable, Any, str]:
  """(step, carry, description) of a one-token wake step, state and cache donated."""
  cfg = sleep_jax.ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
                              layout=args.layout, window=args.window)
  if args.target == "full":
    cfg = cfg.replace(layout="A" * len(args.layout), eviction="none")
  params = sleep_jax.init(cfg, jax.random.key(args.seed))
  steps = args.warmup + args.runs
  if args.target == "full":
    cache = wake_latency.filled_cache(params, 1, args.context + steps, args.context,
                                      jax.random.key(args.seed + 1))
  else:
    cache = sleep_jax.init_cache(params, 1)
  state = sleep_jax.init_state(params, 1)
  tokens = jnp.ones((1, 1), jnp.int32)
  compiled = jax.jit(sleep_jax.wake, donate_argnums=(1, 2)).lower(
      params, state, cache, tokens).compile()

  def step(carry):
    state, cache = carry
    _, state, cache = compiled(params, state, cache, tokens)
    return state, cache

  what = (f"wake step of {cfg.layout} d={cfg.d_model} heads={cfg.num_heads} "
          f"dtype={cfg.compute_dtype.name}, " + (f"{args.context} cached tokens" if
                                                args.target == "full" else f"L={cfg.window}"))
  return step, (state, cache), what


# ----------------------------------------------------------------------------- trace reading


def read_trace(folder: str) -> list[dict]:
  """The events of the newest Perfetto JSON under `folder` (jax.profiler's layout)."""
  paths = sorted(glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {folder}")
  with gzip.open(paths[-1], "rt", encoding="utf-8") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def lines_of(events: Sequence[dict]) -> dict[tuple[str, str], list[tuple[float, float, str]]]:
  """{(process name, thread name): [(start us, duration us, name)]} of the complete events."""
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  lines = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      key = (processes.get(e["pid"], str(e["pid"])),
             threads.get((e["pid"], e.get("tid")), str(e.get("tid"))))
      lines[key].append((float(e["ts"]), float(e["dur"]), e.get("name", "")))
  return dict(lines)


def kernel_lines(lines) -> list[tuple[str, str]]:
  """The lines that hold the device's work (see the module docstring)."""
  device = [key for key in lines if key[0].startswith("/device:")]
  streams = [key for key in device if key[1].startswith("Stream")]
  if streams:
    return sorted(streams)
  derived = ("XLA Modules", "XLA Ops", "Steps", "TensorFlow Ops", "Source code")
  if device:
    return sorted(key for key in device if key[1] not in derived) or sorted(device)
  return sorted(key for key in lines if key[1].startswith("tf_XLA"))


# Host-side bookkeeping on XLA:CPU's lines, not work: the executor waiting for its thunks, and
# markers of a thunk's end.
_NOT_WORK = ("ThunkExecutor", "end: ")


def leaves(events: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
  """The events that do work and enclose no other such event of their line."""
  ordered = sorted((e for e in events if not e[2].startswith(_NOT_WORK)),
                   key=lambda e: (e[0], -e[1]))
  out = []
  for i, (start, dur, name) in enumerate(ordered):
    end = start + dur
    encloses = any(s >= start and s + d <= end for s, d, _ in ordered[i + 1:i + 2])
    if not encloses:
      out.append((start, dur, name))
  return out


def busy_us(events: Sequence[tuple[float, float, str]]) -> float:
  """Length of the union of the events' intervals."""
  total, reach = 0.0, -float("inf")
  for start, dur, _ in sorted(events):
    end = start + dur
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def summarise(lines, calls: int, top: int) -> dict:
  """Per-call events and busy time of each kernel line, and the top event names by time."""
  chosen = kernel_lines(lines)
  per_line, names = [], collections.defaultdict(lambda: [0, 0.0])
  for key in chosen:
    work = leaves(lines[key])
    per_line.append({"process": key[0], "line": key[1], "events_per_call": len(work) / calls,
                     "busy_us_per_call": busy_us(work) / calls})
    for _, dur, name in work:
      names[name][0] += 1
      names[name][1] += dur
  ranked = sorted(names.items(), key=lambda item: -item[1][1])
  total = sum(t for _, t in names.values())
  top_rows = [{"name": name, "events_per_call": n / calls, "us_per_call": t / calls,
               "mean_us": t / n, "share": t / total if total else None}
              for name, (n, t) in ranked[:top]]
  return {"lines": per_line, "top": top_rows,
          "events_per_call": sum(r["events_per_call"] for r in per_line),
          "busy_us_per_call": sum(r["busy_us_per_call"] for r in per_line)}


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  results = common.Results("profile", args)
  print(common.header_line("profile"))
  step, carry, what = (op_target if args.target == "op" else step_target)(args)
  print(what)
  for _ in range(args.warmup):
    carry = jax.block_until_ready(step(carry))
  walls = []
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(args.runs):
        start = time.perf_counter()
        carry = jax.block_until_ready(step(carry))
        walls.append(time.perf_counter() - start)
    summary = summarise(lines_of(read_trace(folder)), args.runs, args.top)
  wall_us = 1e6 * statistics.median(walls)
  results.summary = {"target": args.target, "what": what, "wall_us_per_call": wall_us,
                     "events_per_call": summary["events_per_call"],
                     "busy_us_per_call": summary["busy_us_per_call"],
                     "busy_over_wall": summary["busy_us_per_call"] / wall_us}
  results.summary["lines"] = summary["lines"]
  for row in summary["top"]:
    results.add(row)
  print(f"wall {wall_us:.1f} us per call (median of {args.runs}); kernel lines: "
        f"{summary['events_per_call']:.1f} events, {summary['busy_us_per_call']:.1f} us busy "
        f"per call ({results.summary['busy_over_wall']:.0%} of the wall time)")
  print(common.format_table(summary["lines"], LINE_COLUMNS))
  print(common.format_table(summary["top"], TOP_COLUMNS))
  results.write()
  print(f"wrote {results.path}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
