"""Shared helpers of the model-level benchmarks: flags, compilation, timing, FLOP counts, JSON.

How every benchmark measures (docs/performance.md):

* functions are compiled ahead of time (`jit(...).lower(...).compile()`), so compilation never
  lands in a timed call; several compilations can run at once in threads (`compile_many`);
* after `warmup` untimed calls, each timed call is closed by `jax.block_until_ready` on its
  outputs and the median of `runs` calls is reported (the minimum is kept too);
* inputs rotate over several random sets (never zeros), and stateful steps (decode, train) feed
  their outputs back in (`time_chain`), so no call sees the inputs of the call before it;
* results go to `benchmarks/results/<name>_<backend>.json` (or `--out_dir` / `--out`), rewritten
  after every row so that partial results survive a timeout.

Model FLOPs (`pass_flops`, `loss_flops`) count matrix-multiply work only: the projections, the
attention scores and values, the chunked delta rule and the output head. Shape legend: b batch,
t tokens, L window, d model width, h heads, k / v per-head key / value widths.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import jax
import numpy as np

from sleep_jax import attention
from sleep_jax import train_lib

RESULTS_DIR = os.path.join("benchmarks", "results")

# ----------------------------------------------------------------------------- devices

# Dense bf16 peak FLOP/s per chip (datasheet), matched against `device_kind` in order: the
# first key contained in the lower-cased kind wins, so "v5 lite" is tested before "v5".
_PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one chip named `device_kind` (jax's string), None if unknown."""
  kind = device_kind.lower()
  for key, flops in _PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return None


def backend() -> str:
  return jax.default_backend()


def device_kind() -> str:
  return jax.devices()[0].device_kind


def is_accelerator() -> bool:
  return backend() != "cpu"


# ----------------------------------------------------------------------------- flags


def add_common_flags(parser: argparse.ArgumentParser, *, runs: int = 10,
                     warmup: int = 2) -> None:
  parser.add_argument("--out_dir", default=RESULTS_DIR,
                      help="folder of the JSON result <name>_<backend>.json (default %(default)s)")
  parser.add_argument("--out", default=None, help="JSON path; overrides --out_dir")
  parser.add_argument("--runs", type=int, default=runs,
                      help="timed calls per row; the median is reported (default %(default)s)")
  parser.add_argument("--warmup", type=int, default=warmup,
                      help="untimed calls after compilation (default %(default)s)")
  parser.add_argument("--quick", action="store_true",
                      help="small CPU-sized defaults on any backend (always on for the CPU)")
  parser.add_argument("--compile_threads", type=int, default=min(16, os.cpu_count() or 1),
                      help="compilations run at once (default %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")


def check_common_flags(args: argparse.Namespace) -> None:
  check_int("--runs", args.runs, 1)
  check_int("--warmup", args.warmup, 0)
  check_int("--compile_threads", args.compile_threads, 1)


def quick(args: argparse.Namespace) -> bool:
  """Whether to use the small defaults: asked for, or running on the CPU."""
  return bool(args.quick) or not is_accelerator()


def check_int(flag: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
      maximum is not None and value > maximum):
    upper = "" if maximum is None else f" and <= {maximum}"
    raise ValueError(f"{flag} must be an integer >= {minimum}{upper}, got {value!r}")
  return value


def int_list(flag: str, text: Optional[str], default: Sequence[int], minimum: int = 1
             ) -> tuple[int, ...]:
  """Parses a comma-separated flag of integers (None: `default`)."""
  if text is None:
    return tuple(default)
  try:
    values = tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers >= {minimum}, got {text!r}"
                     ) from None
  if not values:
    raise ValueError(f"{flag} must list at least one integer >= {minimum}, got {text!r}")
  for v in values:
    check_int(flag, v, minimum)
  return values


def op_shape(flag: str, text: str) -> tuple[int, int, int, int]:
  """Parses one fast-weight op shape "BxTxHxD" (Dk = Dv = D) of flag `flag`."""
  parts = text.lower().split("x")
  if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"{flag} must be BxTxHxD with positive ints, got {text!r}")
  return tuple(int(p) for p in parts)


def chunk_unroll(flag: str, text: str) -> int | bool:
  """Parses a chunk-loop unrolling flag: an int >= 1, or "full" (True: no loop)."""
  if text == "full":
    return True
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f"{flag} must be an int >= 1 or 'full', got {text!r}")
  return int(text)


def str_list(flag: str, text: Optional[str], default: Sequence[str], allowed: Sequence[str]
             ) -> tuple[str, ...]:
  """Parses a comma-separated flag of names from `allowed` (None: `default`)."""
  if text is None:
    return tuple(default)
  values = tuple(part.strip() for part in text.split(",") if part.strip())
  bad = [v for v in values if v not in allowed]
  if bad or not values:
    raise ValueError(f"{flag} entries must be among {list(allowed)}, got {text!r}")
  return values


# ----------------------------------------------------------------------------- compilation


@dataclasses.dataclass
class Compiled:
  """An ahead-of-time compiled function with its compile seconds and temporary bytes."""

  fn: Callable
  compile_s: float
  temp_bytes: Optional[int]

  def __call__(self, *args):
    return self.fn(*args)


def abstract(tree):
  """Shapes and dtypes of a pytree's arrays (static fields kept): enough to compile for it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def compile_one(jitted, *args) -> Compiled:
  """Lowers and compiles `jitted` (a `jax.jit` function) for `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  try:
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # memory_analysis is missing on some backends and versions
    temp = None
  return Compiled(compiled, seconds, temp)


def compile_many(jobs: dict[Hashable, tuple[Callable, tuple]], threads: int
                 ) -> dict[Hashable, Compiled | Exception]:
  """Compiles `{key: (jitted, args)}` with up to `threads` compilations at once.

  XLA releases the GIL while it compiles, so threads overlap the slow part. A job that fails
  (e.g. an implementation the backend does not support) maps to its exception.
  """

  def job(item):
    key, (jitted, args) = item
    try:
      return key, compile_one(jitted, *args)
    except Exception as err:  # reported per row by the caller
      return key, err

  if threads <= 1 or len(jobs) <= 1:
    return dict(job(item) for item in jobs.items())
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    return dict(pool.map(job, jobs.items()))


def compile_all(jobs: dict[Hashable, tuple[Callable, tuple]], threads: int
                ) -> dict[Hashable, Compiled]:
  """`compile_many` that prints the time taken and raises if any job failed."""
  start = time.perf_counter()
  compiled = compile_many(jobs, threads)
  print(f"compiled {len(jobs)} functions in {time.perf_counter() - start:.1f} s")
  for key, fn in compiled.items():
    if isinstance(fn, Exception):
      raise RuntimeError(f"compiling {key} failed: {describe_error(fn)}") from fn
  return compiled


def describe_error(err: BaseException, limit: int = 300) -> str:
  text = f"{type(err).__name__}: {err}".replace("\n", " ")
  return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Seconds of each timed call."""

  times_s: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  def summary(self, unit: str = "ms") -> dict[str, float]:
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    return {f"median_{unit}": scale * self.median_s, f"min_{unit}": scale * self.min_s,
            "runs": len(self.times_s)}


def time_calls(fn: Callable, arg_sets: Sequence[tuple], *, runs: int, warmup: int) -> Timing:
  """Times `fn(*arg_sets[i % len])` over calls i: `warmup` untimed calls, then `runs` timed ones."""
  if not arg_sets:
    raise ValueError("time_calls needs at least one argument set")
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  times = []
  for i in range(warmup, warmup + runs):
    args = arg_sets[i % len(arg_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return Timing(times)


def time_chain(step: Callable, carry: Any, inputs: Sequence[Any], *, runs: int, warmup: int
               ) -> tuple[Timing, Any]:
  """Times a stateful step `carry = step(carry, inputs[i % len])`, feeding each output back.

  For steps that donate their carry (decode, train): every call consumes the previous call's
  output, as in real use. Returns the timing and the final carry.
  """
  if not inputs:
    raise ValueError("time_chain needs at least one input")
  for i in range(warmup):
    carry = jax.block_until_ready(step(carry, inputs[i % len(inputs)]))
  times = []
  for i in range(warmup, warmup + runs):
    x = inputs[i % len(inputs)]
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry, x))
    times.append(time.perf_counter() - start)
  return Timing(times), carry


def time_interleaved(chains: Sequence[tuple[Callable, Any]], inputs: Sequence[Any], *, runs: int,
                     warmup: int) -> list[Timing]:
  """`time_chain` for several (step, carry) pairs, one call of each in turn.

  Interleaving spreads background load evenly over the chains, so their ratios stay meaningful
  on a busy machine. The turn order rotates every round (round i starts with chain i mod the number
  of chains): on CPU a call right after the op's scan forward+backward (which allocates a state per
  token) measured up to 35% slower (5-35% over three shapes and three orders) than after another
  call, and a fixed order would charge such an effect to one chain.
  """
  if not inputs:
    raise ValueError("time_interleaved needs at least one input")
  carries = [carry for _, carry in chains]
  times: list[list[float]] = [[] for _ in chains]
  order = list(range(len(chains)))
  for i in range(warmup + runs):
    x = inputs[i % len(inputs)]
    first = i % len(chains)
    for j in order[first:] + order[:first]:
      step = chains[j][0]
      start = time.perf_counter()
      carries[j] = jax.block_until_ready(step(carries[j], x))
      if i >= warmup:
        times[j].append(time.perf_counter() - start)
  return [Timing(t) for t in times]


def random_tokens(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, sets: int
                  ) -> list[jax.Array]:
  """`sets` random int32 token arrays (ids 1..vocab-1, so never all zeros)."""
  return [jax.device_put(rng.integers(1, vocab, size=shape, dtype=np.int32)) for _ in range(sets)]


# ----------------------------------------------------------------------------- model FLOPs


delta_flops_per_token_head = train_lib.delta_rule_flops_per_token_head


def attention_pairs(t: int, *, prefix: int = 0, window: Optional[int] = None) -> int:
  """Query-key pairs of causal attention for t new tokens after `prefix` cached tokens, each
  query seeing itself and the tokens before it, the last `window` of them if given."""
  keys = np.arange(1, t + 1, dtype=np.int64) + prefix
  if window is not None:
    keys = np.minimum(keys, window)
  return int(keys.sum())


def pass_flops(config, tokens: int, pairs: int, *, logits: bool) -> dict[str, int]:
  """Matmul FLOPs of one pass of every block over `tokens` tokens (one sequence).

  `pairs` is the number of query-key pairs each attention head scores (`attention_pairs`).
  Per token: attention blocks `2 d (4 h k)` for q, k, v, o; fast-weight blocks `2 d (5 h k + 2 h)`
  for qkv, gate, o, beta and alpha, plus the chunked op; MLP blocks `3 * 2 d mlp`; attention
  `4 k` per pair and head (scores and values); the head `2 d vocab` where logits are computed.
  """
  d, h, k = config.d_model, config.num_heads, config.resolved_head_dim
  chunk = min(config.resolved_chunk_size, tokens)
  parts = {"projections": 0, "mlp": 0, "attention": 0, "delta_rule": 0, "head": 0}
  for mixer, mlp in config.block_kinds:
    if mixer == "attention":
      parts["projections"] += 2 * tokens * d * 4 * h * k
      parts["attention"] += 4 * k * h * pairs
    else:
      parts["projections"] += 2 * tokens * d * (5 * h * k + 2 * h)
      parts["delta_rule"] += tokens * h * delta_flops_per_token_head(config.rule, k, k, chunk)
    if mlp:
      parts["mlp"] += 2 * tokens * 3 * d * config.resolved_mlp_dim
  if logits:
    parts["head"] = 2 * tokens * d * config.vocab_size
  return parts


def window_pairs(config, window_index: int, *, computed: bool = False) -> int:
  """Attention pairs per head of one pass over window `window_index` inside `sleep_jax.loss`.

  `computed=False` counts the pairs a query may see (causal; the model FLOPs of MFU).
  `computed=True` counts what the XLA implementation multiplies: the full L x L square under hard
  eviction; under sliding eviction L x (2L - 1) cache slots, or L x (n + L - 1) where the model
  attends by blocks of n queries (`sleep_jax.attention`, XLA path, L >= 128).
  """
  L = config.window
  if config.eviction == "sliding":
    if computed:
      if config.attention_impl != "cudnn" and attention.blocks_pay(L):
        return L * (attention.block_size(L, L) + L - 1)
      return L * (2 * L - 1)
    return attention_pairs(L, prefix=0 if window_index == 0 else L - 1, window=L)
  return L * L if computed else attention_pairs(L)


def loss_flops(config, seq_len: int, consolidation_windows: Sequence[bool], n: int, *,
               computed: bool = False) -> dict[str, int]:
  """Forward matmul FLOPs of `sleep_jax.loss` for one example of `seq_len` tokens.

  Consolidation windows run n passes without logits; prediction windows one pass with logits.
  With eviction "none" the whole sequence is one causal pass.
  """
  if config.eviction == "none":
    pairs = seq_len * seq_len if computed else attention_pairs(seq_len)
    return pass_flops(config, seq_len, pairs, logits=True)
  total: dict[str, int] = {}
  for j, consolidate in enumerate(consolidation_windows):
    parts = pass_flops(config, config.window, window_pairs(config, j, computed=computed),
                       logits=not consolidate)
    for name, value in parts.items():
      total[name] = total.get(name, 0) + value * (n if consolidate else 1)
  return total


# ----------------------------------------------------------------------------- results


def _jsonable(value):
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  return str(value)


class Results:
  """Rows of one benchmark, written to JSON after every change."""

  def __init__(self, name: str, args: argparse.Namespace):
    self.name = name
    self.path = args.out or os.path.join(args.out_dir, f"{name}_{backend()}.json")
    self.meta = {
        "benchmark": name, "backend": backend(), "device": device_kind(),
        "device_count": jax.device_count(), "jax_version": jax.__version__,
        "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "flags": _jsonable(vars(args)),
    }
    self.rows: list[dict] = []
    self.summary: dict = {}

  def add(self, row: dict) -> dict:
    self.rows.append(row)
    self.write()
    return row

  def write(self) -> None:
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    payload = dict(self.meta, rows=_jsonable(self.rows), summary=_jsonable(self.summary))
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=1, allow_nan=True)
    os.replace(tmp, self.path)


def header_line(name: str) -> str:
  return (f"== {name}: backend={backend()} device={device_kind()} x{jax.device_count()} "
          f"jax={jax.__version__}")


def format_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A fixed-width text table. columns: (row key, header, format spec such as '.2f')."""
  rows = list(rows)
  cells = [[header for _, header, _ in columns]]
  for row in rows:
    line = []
    for key, _, spec in columns:
      value = row.get(key)
      if value is None or (isinstance(value, float) and math.isnan(value)):
        line.append("-")
      elif isinstance(value, (int, float)) and spec:
        line.append(format(value, spec))
      else:
        line.append(str(value))
    cells.append(line)
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def print_digest(folder: str) -> None:
  """Prints the main table and summary of every result JSON in `folder` (run_gpu.sh's end)."""
  # The scripts import this module: import them here, when a digest is asked for.
  # pylint: disable-next=g-import-not-at-top
  from benchmarks import attention, profile, sleep_cost, train_step, wake_latency
  ops_columns = (("B", "B", "d"), ("T", "T", "d"), ("H", "H", "d"), ("Dk", "D", "d"),
                 ("impl", "impl", ""), ("mode", "mode", ""), ("median_ms", "median ms", ".3f"),
                 ("gflops_per_s", "GFLOP/s", ".4g"), ("fraction_of_peak", "of peak", ".2%"),
                 ("max_diff", "max diff", ".2e"),
                 ("skipped", "skipped", ""),
                 ("error", "error", ""))
  for name in ("ops", "profile", "attention", "wake_latency", "sleep_cost", "train_step"):
    paths = sorted(p for p in os.listdir(folder)
                   if p.startswith(name + "_") and p.endswith(".json"))
    for path in paths:
      with open(os.path.join(folder, path), encoding="utf-8") as f:
        data = json.load(f)
      print(f"\n== {path}: {data.get('device')} jax {data.get('jax_version')} "
            f"{data.get('date_utc', '')}")
      rows = data.get("rows", [])
      if name == "ops":
        for row in rows:
          if isinstance(row.get("error"), str):
            row["error"] = row["error"][:60]
        print(format_table(rows, ops_columns))
        for r in data.get("ratios", []):
          if "scan_over_chunked" in r:  # files written before the ratios were generalised
            r = dict(r, ratio="scan/chunked", value=r["scan_over_chunked"])
          print(f"  {r['ratio']} {r['shape']} {r['mode']}: {r['value']:.2f}x")
      elif name == "attention":
        print(format_table(rows, attention.COLUMNS))
        print(format_table(data.get("summary", {}).get("speedups", []),
                           (("T", "T", "d"), ("mode", "mode", ""), ("what", "comparison", ""),
                            ("speedup", "x", ".2f"))))
      elif name == "wake_latency":
        contexts = sorted({r["context"] for r in rows})
        print(format_table(wake_latency.pivot(rows, contexts), wake_latency.COLUMNS))
      elif name == "sleep_cost":
        print(format_table(rows, sleep_cost.COLUMNS))
      elif name == "profile":
        print(format_table(rows, profile.TOP_COLUMNS))
      else:
        print(format_table(rows, train_step.COLUMNS))
      for key, value in data.get("summary", {}).items():
        if key not in ("speedups", "lines"):
          print(f"  {key}: {value}")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  """a / b, or None when either is missing or b is zero."""
  if a is None or b is None or b == 0:
    return None
  return a / b
