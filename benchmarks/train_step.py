"""Training throughput and MFU of `sleep_jax.loss` under `jax.value_and_grad` plus an AdamW update.

The step is `jax.jit` of: `value_and_grad(sleep_jax.loss)` with the task's static layout of
consolidation windows, then `optax.adamw` and `optax.apply_updates`, with parameters and optimiser
state donated. Configurations (batch sizes are the paper's where it gives them):

=========  =========================  ====  ======  ========  =====  =================  =====
name       blocks                     d     heads   L         T      windows (sleep+1)  batch
=========  =========================  ====  ======  ========  =====  =================  =====
ca         AGAG                       256   4x64    24 hard   120    4 + 1              512
multihop   AGAGAGAGAG                 512   8x64    75 hard   375    4 + 1              128
math       (AG)x6                     768   6x128   512 slid. 3584   6 + 1              16
350m       (AG)x12                    1024  8x128   2048 hard 8192   3 + 1              8
=========  =========================  ====  ======  ========  =====  =================  =====

(`math` is our choice of size for the math task at the paper's sliding window L = 512; `350m`
has 350M parameters with a 16384-token vocabulary and runs its blocks as a scan over the 12
repeats of "AG", `scan_layers=True`.) Each runs at N in 1, 2, 4; `350m` at N = 1
also with `attention_impl="cudnn"` on a GPU and with `attention_impl="splash"` on a TPU, and
with `--unrolled` configurations at N = 1 also with `delta_unroll=1024` (the fast-weight op's
chunk loops written out; on a GPU each pass's kernels can then run as CUDA graphs).

Model FLOPs per step are 3 x the forward matmul FLOPs of `benchmarks.common.loss_flops` (the
projections, the visible causal attention pairs, the chunked delta rule and the output head on
prediction windows, times the passes of each window); MFU divides them by the step time and the
chip's dense bf16 peak. Rematerialisation is not counted. Run from the repository root:

    python -m benchmarks.train_step                          # GPU set on a GPU, small on CPU
    python -m benchmarks.train_step --configs=350m --passes=1 --runs=10
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sleep_jax

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class Preset:
  config: dict
  seq_len: int
  consolidation: tuple[bool, ...]
  batch: int          # accelerator default
  quick_batch: int    # CPU default


def _layout(num_sleep: int) -> tuple[bool, ...]:
  return (True,) * num_sleep + (False,)


PRESETS = {
    "ca": Preset(dict(vocab_size=19, d_model=256, num_heads=4, layout="AGAG", window=24,
                      eviction="hard"), 120, _layout(4), 512, 16),
    "multihop": Preset(dict(vocab_size=113, d_model=512, num_heads=8, layout="AG" * 5,
                            window=75, eviction="hard"), 375, _layout(4), 128, 2),
    "math": Preset(dict(vocab_size=171, d_model=768, num_heads=6, layout="AG" * 6, window=512,
                        eviction="sliding"), 3584, _layout(6), 16, 1),
    # Blocks scanned over the 12 repeats of "AG": on a 2-core CPU its step compiles in 29 s
    # instead of 100 s (docs/performance.md).
    "350m": Preset(dict(vocab_size=16384, d_model=1024, num_heads=8, layout="AG" * 12,
                        window=2048, eviction="hard", scan_layers=True), 8192, _layout(3), 8, 1),
    # One attention block without MLP: a smoke test that compiles in seconds.
    "tiny": Preset(dict(vocab_size=32, d_model=32, num_heads=2, layout="a", window=8,
                        eviction="hard"), 24, _layout(2), 4, 2),
}


# `delta_unroll` of the `--unrolled` rows: more chunks than any pass here has, so no loop is left.
UNROLLED = 1024
# Rows at N = 1 that compute a preset another way, each asked for by the flag of its name.
VARIANTS = ("cudnn", "splash", "unrolled")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", help=f"comma-separated among {sorted(PRESETS)} (default "
                      "GPU/TPU 350m,ca,multihop,math; CPU ca)")
  parser.add_argument("--passes", help="N values (default 1,2,4)")
  parser.add_argument("--batch", type=int, help="batch for every config (default: per config)")
  parser.add_argument("--cudnn", help="configs also timed at N = 1 with attention_impl=cudnn "
                      "(default 350m on a GPU, none elsewhere; 'none' for none)")
  parser.add_argument("--splash", help="configs also timed at N = 1 with attention_impl=splash "
                      "(default 350m on a TPU, none elsewhere; 'none' for none)")
  parser.add_argument("--unrolled", help="configs also timed at N = 1 with the fast-weight "
                      f"op's chunk loops written out (delta_unroll={UNROLLED}; default none; "
                      "'none' for none)")
  parser.add_argument("--peak_tflops", type=float,
                      help="peak TFLOP/s per chip for MFU (default: from the device kind)")
  parser.add_argument("--learning_rate", type=float, default=1e-4)
  common.add_common_flags(parser, runs=5, warmup=2)
  args = parser.parse_args(argv)
  common.check_common_flags(args)
  small = common.quick(args)
  args.configs = common.str_list("--configs", args.configs,
                                 ("ca",) if small else ("350m", "ca", "multihop",
                                                                    "math"), tuple(PRESETS))
  args.passes = common.int_list("--passes", args.passes, (1, 2, 4))
  if args.batch is not None:
    common.check_int("--batch", args.batch, 1)
  for impl, backend in (("cudnn", "gpu"), ("splash", "tpu"), ("unrolled", None)):
    value = getattr(args, impl)
    if value in (None, ""):
      value = ("350m",) if common.backend() == backend and "350m" in args.configs else ()
    elif value == "none":
      value = ()
    else:
      value = common.str_list(f"--{impl}", value, (), args.configs)
    setattr(args, impl, value)
  if args.peak_tflops is not None and args.peak_tflops <= 0:
    raise ValueError(f"--peak_tflops must be > 0, got {args.peak_tflops}")
  return args


def variant_config(cfg: sleep_jax.ModelConfig, variant: Optional[str]) -> sleep_jax.ModelConfig:
  """The config a row computes with: the default, another attention_impl, or unrolled loops."""
  if variant is None:
    return cfg
  if variant == "unrolled":
    return cfg.replace(delta_unroll=UNROLLED)
  return cfg.replace(attention_impl=variant)


def make_step(n: int, consolidation: tuple[bool, ...], optimizer):
  """The jitted train step: (params, opt_state, batch) -> (params, opt_state, loss)."""

  def step(params, opt_state, batch):
    def objective(p):
      return sleep_jax.loss(p, batch, n, consolidation_windows=consolidation)

    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params)
    # The optimiser state holds the weights only: one state serves every way of computing the
    # same model (attention_impl changes `params.config`, a static part of the pytree).
    updates, opt_state = optimizer.update(grads.weights, opt_state, params.weights)
    return params.replace(weights=optax.apply_updates(params.weights, updates)), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def random_batch(rng: np.random.Generator, preset: Preset, batch: int, vocab: int) -> dict:
  """Random tokens and targets; the loss mask covers the prediction windows."""
  L = preset.config["window"]
  mask = np.repeat(np.logical_not(np.asarray(preset.consolidation)), L)[None].repeat(batch, 0)
  return {"tokens": jnp.asarray(rng.integers(1, vocab, (batch, preset.seq_len)), jnp.int32),
          "targets": jnp.asarray(rng.integers(1, vocab, (batch, preset.seq_len)), jnp.int32),
          "loss_mask": jnp.asarray(mask)}


def count_params(weights) -> tuple[int, int]:
  """(all parameters, parameters outside the embedding and the head)."""
  total = sum(x.size for x in jax.tree.leaves(weights))
  outer = weights["embedding"]["embedding"].size + weights["head"]["kernel"].size
  return total, total - outer


COLUMNS = (("config", "config", ""), ("N", "N", "d"), ("attention", "attn", ""),
           ("delta_unroll", "unroll", "d"),
           ("batch", "batch", "d"), ("params_m", "params M", ".1f"),
           ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ".4g"),
           ("model_tflops_per_s", "model TFLOP/s", ".3g"), ("mfu", "MFU", ".1%"),
           ("compile_s", "compile s", ".0f"), ("note", "note", ""))


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  results = common.Results("train_step", args)
  print(common.header_line("train_step"))
  small = common.quick(args)
  peak = 1e12 * args.peak_tflops if args.peak_tflops else common.peak_flops(common.device_kind())
  results.meta["peak_flops"] = peak
  optimizer = optax.adamw(args.learning_rate, weight_decay=0.01)
  rng = np.random.default_rng(args.seed)

  # Rows in the order they are timed: the headline configuration first, so that a timeout
  # leaves the most important numbers.
  plan = []
  for name in args.configs:
    for n in args.passes:
      plan.append((name, n, None))
      for variant in VARIANTS:
        if n == 1 and name in getattr(args, variant):
          plan.append((name, n, variant))
  if "350m" in args.configs and len(args.passes) > 1:
    head = [p for p in plan if p[0] == "350m" and p[1] == args.passes[0]]
    plan = head + [p for p in plan if p not in head]

  models, batches = {}, {}
  for name in args.configs:
    preset = PRESETS[name]
    cfg = sleep_jax.ModelConfig(**preset.config)
    b = args.batch or (preset.quick_batch if small else preset.batch)
    params = sleep_jax.init(cfg, jax.random.key(args.seed))
    models[name] = (cfg, b, params, optimizer.init(params.weights))
    batches[name] = [random_batch(rng, preset, b, cfg.vocab_size) for _ in range(2)]

  jobs = {}
  for name, n, variant in plan:
    cfg, b, params, opt_state = models[name]
    p = params.replace(config=variant_config(cfg, variant))
    jobs[(name, n, variant)] = (make_step(n, PRESETS[name].consolidation, optimizer),
                                common.abstract((p, opt_state, batches[name][0])))

  # On an accelerator, compilation (host) overlaps with the timing of earlier rows (device); on
  # the CPU everything is compiled before anything is timed.
  start = time.perf_counter()
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_threads)
  futures = {key: pool.submit(common.compile_one, jitted, *shapes)
             for key, (jitted, shapes) in jobs.items()}
  if not common.is_accelerator():
    concurrent.futures.wait(list(futures.values()))
    print(f"compiled {len(jobs)} steps in {time.perf_counter() - start:.1f} s")

  for name, n, variant in plan:
    cfg, b, params, opt_state = models[name]
    run_cfg = variant_config(cfg, variant)
    preset = PRESETS[name]
    total, non_embedding = count_params(params.weights)
    row = {"config": name, "N": n, "attention": run_cfg.attention_impl or "default",
           "delta_unroll": run_cfg.delta_unroll, "batch": b,
           "seq_len": preset.seq_len, "window": cfg.window, "eviction": cfg.eviction,
           "layout": cfg.layout, "d_model": cfg.d_model, "heads": cfg.num_heads,
           "params_m": total / 1e6, "non_embedding_params_m": non_embedding / 1e6,
           "dtype": cfg.compute_dtype.name}
    try:
      fn = futures[(name, n, variant)].result()
    except Exception as err:  # e.g. cuDNN attention unsupported here
      row["note"] = "unavailable: " + common.describe_error(err, 160)
      results.add(row)
      print(common.format_table([row], COLUMNS))
      continue
    p = params.replace(config=run_cfg)

    def step(carry, batch, fn=fn):
      params, opt_state, _ = carry
      return fn(params, opt_state, batch)

    try:
      timing, carry = common.time_chain(step, (p, opt_state, None), batches[name],
                                        runs=args.runs, warmup=args.warmup)
    except Exception as err:  # out of memory, etc.: keep going with the other rows
      row["note"] = "failed: " + common.describe_error(err, 160)
      results.add(row)
      print(common.format_table([row], COLUMNS))
      # The donated parameters may be gone: start this config again from fresh ones.
      params = sleep_jax.init(cfg, jax.random.key(args.seed))
      models[name] = (cfg, b, params, optimizer.init(params.weights))
      continue
    new_params, new_opt, loss = carry
    # Carry the updated (donated) state on to the next row of this config.
    models[name] = (cfg, b, new_params.replace(config=cfg), new_opt)
    parts = common.loss_flops(cfg, preset.seq_len, preset.consolidation, n)
    flops = 3 * b * sum(parts.values())
    step_s = timing.median_s
    row.update(timing.summary("ms"), step_ms=1e3 * step_s, compile_s=fn.compile_s,
               temp_bytes=fn.temp_bytes, loss=float(loss),
               tokens_per_s=b * preset.seq_len / step_s,
               window_pass_tokens_per_s=b * cfg.window * sum(
                   n if c else 1 for c in preset.consolidation) / step_s,
               flops_per_step=flops, flops_parts_forward=parts,
               model_tflops_per_s=flops / step_s / 1e12,
               mfu=None if peak is None else flops / step_s / peak)
    results.add(row)
    print(common.format_table([row], COLUMNS))
  pool.shutdown()

  one = [r for r in results.rows if r["config"] == "350m" and r["N"] == 1 and "mfu" in r]
  if one and one[0]["mfu"] is not None:
    best = max(r["mfu"] for r in one)
    results.summary["350m_n1_best_mfu"] = best
    results.summary["goal_350m_n1_mfu_at_least_35pct"] = best >= 0.35
  results.write()
  print("\n" + common.format_table(results.rows, COLUMNS))
  for name, value in results.summary.items():
    print(f"  {name}: {value}")
  print(f"wrote {results.path}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
