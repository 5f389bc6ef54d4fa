"""Times the fast-weight op: per-token scan vs chunkwise-parallel (pure JAX, and with the Pallas
kernel for the inter-chunk recurrence), forward and forward+backward.

Prints a table and writes JSON. Each timed call gets the next of several random input sets
(never zeros); after compilation and warm-up, the median of ``--runs`` calls is reported,
with ``block_until_ready`` on every output. The implementations take turns call by call,
in an order that rotates every round, so that background load on a shared machine, and what
the previous call left behind, affect their ratio as little as possible.
Forward+backward is the gradient of a random linear functional of ``(o, final_state)`` with
respect to all six inputs. ``pallas`` has no backward kernel: its backward pass is the pure-JAX
chunked form's (``sleep_jax/ops/gated_delta_pallas.py``).

FLOP counts per token per head (the chunked form, C = chunk size): ``6 Dk Dv + C (6 Dk +
4 Dv)`` for the gated delta rule (docs/delta_rule.md derives it) and ``4 Dk Dv + 2 C (Dk +
Dv)`` for the Hebbian rule; the per-token scan does ``6 Dk Dv`` (gated delta) or ``4 Dk Dv``
(Hebbian); ``pallas`` is counted as the chunked form. Forward+backward is counted as three
forwards. ``% peak`` is the achieved FLOP/s over the chip's dense bf16 peak (``--peak_tflops``,
by default from the device kind for H100/H200 and TPU v5e/v5p/v6e; blank where unknown, e.g.
on CPU); float32 inputs are measured against the same bf16 peak. ``max diff`` is each
implementation's largest deviation from the scan (or the chunked form) on the first input set,
relative to the largest output; the ratios at the end compare times within one shape and mode.

``fla`` is flash-linear-attention's ``chunk_gated_delta_rule`` (PyTorch + Triton; forward
only, gated delta rule only; on by default on a GPU): timed after the JAX implementations of
each shape, so their rows are written even if it runs out of time (its first call autotunes
its Triton kernels, which took over a minute on an H200). Its FLOPs are counted as the chunked
form's at its own chunk, 64; where it cannot run, its row says why.

    python -m benchmarks.ops                       # default shapes for the backend
    python -m benchmarks.ops --shapes=1x2048x4x64 --runs=9 --out=/tmp/ops.json
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from sleep_jax.ops import default_chunk_size
from sleep_jax.ops import gated_delta_rule
from sleep_jax.ops.gated_delta import resolve_impl

_SHAPES = flags.DEFINE_list(
    "shapes", None,
    "Shapes as BxTxHxD (Dk = Dv = D). Default: a CPU set including 1x2048x4x64, or on "
    "GPU/TPU B=4, H=16, D=128 with T from 1024 to 16384.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"],
    "Dtype of q, k, v. Default float32 on CPU, bfloat16 on accelerators.")
_CHUNK = flags.DEFINE_integer(
    "chunk_size", None,
    "Chunk size of the chunked form. Default: the backend's for each shape's D (32 on CPU, "
    "16 there for D <= 32, 64 on GPU and TPU; sleep_jax.ops.default_chunk_size).")
_RULE = flags.DEFINE_enum("rule", "gated_delta", ["gated_delta", "hebbian"], "Update rule.")
_IMPLS = flags.DEFINE_list(
    "impls", None, "Implementations to time among scan, chunked, unrolled (the chunked form "
    "with its chunk loop unrolled by --unroll), pallas, auto, fla (default: "
    "scan, chunked; plus pallas on GPU/TPU and fla on GPU; on CPU the Pallas kernel only runs in "
    "its slow interpreter).")
_UNROLL = flags.DEFINE_string(
    "unroll", "full",
    "Chunk-loop unrolling of the `unrolled` implementation (the chunked form with "
    "gated_delta_rule's unroll=): an int >= 1 (chunks per loop iteration) or 'full' (no loop).")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd.")
_RUNS = flags.DEFINE_integer("runs", 7, "Timed calls per row (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_INPUT_SETS = flags.DEFINE_integer("input_sets", 3, "Random input sets rotated over calls.")
_SCAN_BWD_MAX_GIB = flags.DEFINE_float(
    "scan_bwd_max_gib", 16.0,
    "Skip scan forward+backward when the per-token states it keeps for the backward pass "
    "(T * B * H * Dk * Dv * 4 bytes) exceed this many GiB.")
_PEAK = flags.DEFINE_float(
    "peak_tflops", None,
    "Dense bf16 peak TFLOP/s of the chip for the '% peak' column. Default: from the device kind "
    "(H100/H200 989, TPU v5e 197, v5p 459, v6e 918); none on CPU.")
_OUT = flags.DEFINE_string(
    "out", None, "JSON output path. Default benchmarks/results/ops_<backend>.json.")

_FLA_CHUNK = 64  # the chunk flash-linear-attention's chunk_gated_delta_rule uses

_CPU_SHAPES = ["1x16x4x64", "1x64x4x64", "1x256x4x64", "1x2048x4x64", "4x512x8x32", "16x256x4x16"]
_ACCEL_SHAPES = ["4x1024x16x128", "4x4096x16x128", "4x16384x16x128"]


def _flops_per_token_head(impl: str, mode: str, rule: str, dk: int, dv: int, chunk: int) -> int:
  """The per-token scan costs one decode step a token; every chunked form the chunked count;
  "scan+chunked" (auto on CPU) the scan's forward only and the chunked form's under grad."""
  scan = impl == "scan" or (impl == "scan+chunked" and mode == "fwd")
  return common.delta_flops_per_token_head(rule, dk, dv, 1 if scan else chunk)


def _make_inputs(rng: np.random.Generator, b: int, t: int, h: int, d: int, dtype) -> tuple:
  """Realistic inputs: unit-norm q and k, beta in (0, 1), log_alpha in [-1, 0)."""

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  q = unit(rng.standard_normal((b, t, h, d)))
  k = unit(rng.standard_normal((b, t, h, d)))
  v = rng.standard_normal((b, t, h, d))
  beta = rng.uniform(0.05, 0.95, (b, t, h))
  log_alpha = rng.uniform(-1.0, -0.01, (b, t, h))
  state = 0.1 * rng.standard_normal((b, h, d, d))
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(beta, jnp.float32), jnp.asarray(log_alpha, jnp.float32),
          jnp.asarray(state, jnp.float32))


def _build(impl: str, mode: str, rule: str, chunk: int, cotangents,
           unroll: int | bool = 1) -> Callable:
  if impl == "unrolled":
    impl = "chunked"
  else:
    unroll = 1

  def forward(q, k, v, beta, log_alpha, state):
    return gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, impl=impl,
                            chunk_size=chunk, rule=rule, unroll=unroll)

  if mode == "fwd":
    return jax.jit(forward)

  def functional(*args):
    o, final_state = forward(*args)
    return (jnp.sum(o.astype(jnp.float32) * cotangents[0])
            + jnp.sum(final_state * cotangents[1]))

  return jax.jit(jax.grad(functional, argnums=tuple(range(6))))


def _compile(fn: Callable, args) -> tuple[Callable, float, int | None]:
  """Compiles ``fn`` ahead of time; returns it with the compile seconds and its temporary
  buffer bytes (None where the backend does not report them)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  try:
    temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # memory_analysis is not available on every backend / version
    temp_bytes = None
  return compiled, compile_s, temp_bytes


def _differences(outputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Each implementation's largest deviation from a reference implementation's outputs on the
  same inputs (the scan, else the pure-JAX chunked form), relative to the reference's largest
  magnitude over all outputs: a fast path that is fast but wrong shows here before its time
  is read."""
  reference = next((name for name in ("scan", "chunked") if name in outputs), None)
  if reference is None:
    return {name: {} for name in outputs}
  expected = [np.asarray(x, np.float64) for x in jax.tree.leaves(outputs[reference])]
  magnitude = max(float(np.max(np.abs(x))) for x in expected)
  out = {}
  for name, result in outputs.items():
    got = [np.asarray(x, np.float64) for x in jax.tree.leaves(result)]
    worst = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected))
    out[name] = {"max_diff": worst / magnitude, "diff_reference": reference}
  return out


def _time_fla(shape, dtype_name: str, runs: int, warmup: int) -> dict[str, Any] | None:
  """flash-linear-attention forward on the same shape, if it can be imported."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=g-import-not-at-top
  except Exception as err:  # torch / triton / fla absent: the comparison is optional
    return {"error": f"fla not importable: {type(err).__name__}: {err}"}
  if not torch.cuda.is_available():
    return {"error": "fla needs CUDA"}
  b, t, h, d = shape
  tdtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
  gen = torch.Generator(device="cuda").manual_seed(0)

  def make():
    q = torch.nn.functional.normalize(
        torch.randn(b, t, h, d, device="cuda", generator=gen), dim=-1).to(tdtype)
    k = torch.nn.functional.normalize(
        torch.randn(b, t, h, d, device="cuda", generator=gen), dim=-1).to(tdtype)
    v = torch.randn(b, t, h, d, device="cuda", generator=gen).to(tdtype)
    beta = torch.rand(b, t, h, device="cuda", generator=gen).to(tdtype) * 0.9 + 0.05
    g = -torch.rand(b, t, h, device="cuda", generator=gen) * 0.99 - 0.01
    state = 0.1 * torch.randn(b, h, d, d, device="cuda", generator=gen)
    return q, k, v, g, beta, state

  sets = [make() for _ in range(3)]

  def call(args):
    q, k, v, g, beta, state = args
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=d ** -0.5, initial_state=state,
                                  output_final_state=True)

  try:
    for i in range(warmup + 1):
      call(sets[i % 3])
    torch.cuda.synchronize()
    times = []
    for i in range(runs):
      start = time.perf_counter()
      call(sets[i % 3])
      torch.cuda.synchronize()
      times.append(time.perf_counter() - start)
  except Exception as err:  # version mismatch with the installed Triton, etc.
    return {"error": f"fla call failed: {type(err).__name__}: {err}"}
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def _write_json(path: str, rows: list, ratios: list, peak: float | None) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "jax_version": jax.__version__, "peak_flops": peak, "rows": rows,
               "ratios": ratios}, f, indent=1)


def _rate_columns(flops: float, seconds: float, peak: float | None) -> tuple[dict, str]:
  """Achieved GFLOP/s and fraction of peak for a row, and their printed columns."""
  rate = flops / seconds
  fields = {"flops": flops, "gflops_per_s": rate / 1e9,
            "fraction_of_peak": None if peak is None else rate / peak}
  percent = "" if peak is None else f"{100 * rate / peak:7.2f}"
  return fields, f"{rate / 1e9:>9.1f} {percent:>7}"


def main(argv):
  del argv
  backend = jax.default_backend()
  accelerator = backend != "cpu"
  shapes = [common.op_shape("--shapes entries", s) for s in (_SHAPES.value or
                                       (_ACCEL_SHAPES if accelerator else _CPU_SHAPES))]
  dtype_name = _DTYPE.value or ("bfloat16" if accelerator else "float32")
  dtype = jnp.dtype(dtype_name)
  impls = _IMPLS.value or (["scan", "chunked"] + (["pallas"] if accelerator else [])
                           + (["fla"] if backend == "gpu" else []))
  for name in impls:
    if name not in ("scan", "chunked", "unrolled", "pallas", "auto", "fla"):
      raise ValueError(f"--impls entries must be scan, chunked, unrolled, pallas, auto or fla, "
                       f"got {name!r}.")
  unroll = common.chunk_unroll("--unroll", _UNROLL.value)
  time_fla = "fla" in impls and "fwd" in _MODES.value
  impls = [name for name in impls if name != "fla"]
  for name in _MODES.value:
    if name not in ("fwd", "fwdbwd"):
      raise ValueError(f"--modes entries must be fwd or fwdbwd, got {name!r}.")
  if _RUNS.value < 1 or _INPUT_SETS.value < 1 or _WARMUP.value < 0:
    raise ValueError("--runs and --input_sets must be >= 1 and --warmup >= 0.")
  if _CHUNK.value is not None and _CHUNK.value < 1:
    raise ValueError(f"--chunk_size must be >= 1, got {_CHUNK.value}.")
  if _PEAK.value is not None and _PEAK.value <= 0:
    raise ValueError(f"--peak_tflops must be > 0, got {_PEAK.value}.")
  peak = 1e12 * _PEAK.value if _PEAK.value else common.peak_flops(common.device_kind())
  out_path = _OUT.value or os.path.join("benchmarks", "results", f"ops_{backend}.json")

  rng = np.random.default_rng(0)
  rows = []
  print(f"backend={backend} device={jax.devices()[0].device_kind} dtype={dtype_name} "
        f"rule={_RULE.value} chunk={_CHUNK.value or 'per D'} jax={jax.__version__} "
        f"peak={'unknown' if peak is None else f'{peak / 1e12:g} TFLOP/s'}")
  header = (f"{'B':>3} {'T':>6} {'H':>3} {'D':>4} {'impl':>8} {'mode':>7} "
            f"{'median ms':>10} {'min ms':>9} {'GFLOP/s':>9} {'% peak':>7} {'temp MiB':>9} "
            f"{'max diff':>10}")
  print(header)
  for shape in shapes:
    b, t, h, d = shape
    chunk = default_chunk_size(backend, d) if _CHUNK.value is None else _CHUNK.value
    input_sets = [_make_inputs(rng, b, t, h, d, dtype) for _ in range(_INPUT_SETS.value)]
    cotangents = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32),
                  jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32))
    for mode in _MODES.value if impls else ():
      # impl -> (fn, compile seconds, temp bytes), or ("skipped" | "error", why): one
      # implementation that fails to compile or run (a kernel the backend's compiler rejects)
      # leaves the others' rows intact.
      compiled, first_outputs = {}, {}
      for impl in impls:
        kept_gib = t * b * h * d * d * 4 / 2 ** 30
        if impl == "scan" and mode == "fwdbwd" and kept_gib > _SCAN_BWD_MAX_GIB.value:
          compiled[impl] = ("skipped", f"scan backward would keep {kept_gib:.1f} GiB of states")
          continue
        try:
          compiled[impl] = _compile(_build(impl, mode, _RULE.value, chunk, cotangents, unroll),
                                    input_sets[0])
          first_outputs[impl] = jax.block_until_ready(compiled[impl][0](*input_sets[0]))
        except Exception as err:  # pylint: disable=broad-except
          compiled[impl] = ("error", "failed: " + common.describe_error(err))
      runnable = {i: c[0] for i, c in compiled.items() if callable(c[0])}
      diffs = _differences(first_outputs)
      del first_outputs
      # One untimed round more than --warmup: every implementation has run once after all
      # others compiled. Turns rotate every round (common.time_interleaved).
      timings = dict(zip(runnable, common.time_interleaved(
          [(lambda carry, args, fn=fn: fn(*args), None) for fn in runnable.values()],
          input_sets, runs=_RUNS.value, warmup=_WARMUP.value + 1)))
      for impl in impls:
        row = {"B": b, "T": t, "H": h, "Dk": d, "Dv": d, "impl": impl, "mode": mode,
               "dtype": dtype_name, "rule": _RULE.value, "chunk_size": chunk}
        if impl == "unrolled":
          row["unroll"] = _UNROLL.value
        rows.append(row)
        if impl not in runnable:
          kind, why = compiled[impl]
          row[kind] = why
          print(f"{b:>3} {t:>6} {h:>3} {d:>4} {impl:>8} {mode:>7}  {kind} ({why})")
          continue
        _, compile_s, temp_bytes = compiled[impl]
        median = timings[impl].median_s
        flops = (b * t * h * (3 if mode == "fwdbwd" else 1)
                 * _flops_per_token_head(resolve_impl(impl.replace("unrolled", "chunked")),
                                         mode, _RULE.value, d, d,
                                         min(chunk, t)))
        rate, rate_text = _rate_columns(flops, median, peak)
        row.update(median_ms=1e3 * median, min_ms=1e3 * timings[impl].min_s,
                   runs=len(timings[impl].times_s), compile_s=compile_s, temp_bytes=temp_bytes,
                   **rate, **diffs[impl])
        temp = "" if temp_bytes is None else f"{temp_bytes / 2 ** 20:9.1f}"
        diff = f"{diffs[impl]['max_diff']:10.2e}" if diffs[impl] else ""
        print(f"{b:>3} {t:>6} {h:>3} {d:>4} {impl:>8} {mode:>7} {row['median_ms']:>10.2f} "
              f"{row['min_ms']:>9.2f} {rate_text} {temp:>9} {diff}")
    _write_json(out_path, rows, [], peak)   # partial results survive a later failure
    if time_fla:
      fla = (_time_fla(shape, dtype_name, _RUNS.value, _WARMUP.value)
             if _RULE.value == "gated_delta" else {"error": "fla times the gated delta rule only"})
      row = {"B": b, "T": t, "H": h, "Dk": d, "Dv": d, "impl": "fla", "mode": "fwd",
             "dtype": dtype_name, "rule": _RULE.value, **fla}
      rows.append(row)
      if "median_ms" in fla:
        rate, rate_text = _rate_columns(
            b * t * h * _flops_per_token_head("chunked", "fwd", "gated_delta", d, d,
                                              min(_FLA_CHUNK, t)),
            fla["median_ms"] / 1e3, peak)
        row.update(rate)
        print(f"{b:>3} {t:>6} {h:>3} {d:>4} {'fla':>8} {'fwd':>7} {fla['median_ms']:>10.2f} "
              f"{fla['min_ms']:>9.2f} {rate_text}")
      else:
        print(f"{b:>3} {t:>6} {h:>3} {d:>4} {'fla':>8} {'fwd':>7}  {fla['error']}")
      _write_json(out_path, rows, [], peak)

  ratios = []
  for shape in shapes:
    for mode in _MODES.value:
      found = {r["impl"]: r for r in rows if (r["B"], r["T"], r["H"], r["Dk"]) == shape
               and r["mode"] == mode and "median_ms" in r}
      # Time ratios: the scan over each chunked form and over auto (their speed-ups), each
      # over fla (the goal is at most 2x), the kernel and the unrolled loop over the pure-JAX
      # form.
      for num, den in (("scan", "chunked"), ("scan", "auto"), ("scan", "pallas"),
                       ("chunked", "fla"),
                       ("pallas", "fla"), ("unrolled", "fla"), ("pallas", "chunked"),
                       ("unrolled", "chunked")):
        if num in found and den in found:
          ratios.append({"shape": "x".join(map(str, shape)), "mode": mode,
                         "ratio": f"{num}/{den}",
                         "value": found[num]["median_ms"] / found[den]["median_ms"]})
  print("\ntime ratios (scan/chunked > 1: chunked faster; chunked/fla: times slower than fla)")
  for r in ratios:
    print(f"  {r['shape']:>16} {r['mode']:>7} {r['ratio']:>15} {r['value']:6.2f}x")

  _write_json(out_path, rows, ratios, peak)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
