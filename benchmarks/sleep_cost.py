"""Cost of sleeping at a window boundary, against the wake prefills it amounts to.

For every window length L and number of passes N:

* `sleep`: the jitted `sleep_jax.sleep(params, state, window, N)` (N passes over the window from
  an empty window cache), and the tokens it consolidates per second (batch x L / time);
* `prefill`: one jitted `sleep_jax.wake` over the whole window from an empty window cache (one
  pass plus the output head); `pass`: the same pass without the output head
  (`embed` + `forward_pass`), since sleep passes compute no logits;
* `boundary`: what `sleep_jax.streaming.Stream` runs at a boundary: wake already made pass 1, so
  N - 1 passes continue from wake's residual stream and state, then the cache is evicted
  (`shortcut=True`, the default; its state is donated as in the stream). Every row uses the
  same float32-stored weights; `Stream` itself computes with `sleep_jax.inference_params`, which
  makes its boundaries and its prefills alike cheaper where the compute dtype is bf16.

Inputs are random (tokens, a nonzero fast-weight state, wake's residual stream): the cost depends
on shapes only, so no stream has to be run first. Everything is compiled up front, in threads.
Reported ratios: sleep / (N prefills) and sleep / (N passes); boundary / ((N - 1) prefills)
(the goal: at most 1.1) and boundary / ((N - 1) passes). The calls of one window length are timed
in turn (interleaved), so background load hits them alike. Run from the repository root:

    python -m benchmarks.sleep_cost                          # GPU sizes on a GPU, small on CPU
    python -m benchmarks.sleep_cost --windows=2048 --passes=1,4 --batch=16
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sleep_jax
from sleep_jax import model as model_lib
from sleep_jax import streaming
from sleep_jax.model import Params

from benchmarks import common


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--windows", help="window lengths L (default GPU 512,1024,2048,4096; "
                      "CPU 32,64,128)")
  parser.add_argument("--passes", help="N values (default 1,2,4,8)")
  parser.add_argument("--batch", type=int, help="windows slept together (default GPU 8, CPU 2)")
  parser.add_argument("--d_model", type=int, help="width (default GPU 1024, CPU 128)")
  parser.add_argument("--heads", type=int, help="heads (default GPU 8, CPU 4)")
  parser.add_argument("--layout", help="blocks (default GPU AGAGAGAG, CPU AGAG)")
  parser.add_argument("--eviction", choices=("hard", "sliding"), default="hard")
  parser.add_argument("--vocab", type=int, help="vocabulary (default GPU 32768, CPU 256)")
  parser.add_argument("--delta_impl", choices=sleep_jax.config.DELTA_IMPLS, default="auto",
                      help="the fast-weight op's implementation (ModelConfig.delta_impl)")
  common.add_common_flags(parser, runs=10)
  args = parser.parse_args(argv)
  common.check_common_flags(args)
  small = common.quick(args)
  args.windows = common.int_list("--windows", args.windows,
                                 (32, 64, 128) if small else (512, 1024, 2048, 4096), minimum=2)
  args.passes = common.int_list("--passes", args.passes, (1, 2, 4, 8))
  args.batch = common.check_int("--batch", args.batch or (2 if small else 8), 1)
  args.d_model = common.check_int("--d_model", args.d_model or (128 if small else 1024), 1)
  args.heads = common.check_int("--heads", args.heads or (4 if small else 8), 1)
  args.layout = args.layout or ("AGAG" if small else "AGAGAGAG")
  args.vocab = common.check_int("--vocab", args.vocab or (256 if small else 32768), 2)
  return args


def sleep_fn(n: int):
  return jax.jit(lambda params, state, ctx: sleep_jax.sleep(params, state, ctx, n))


@jax.jit
def one_pass(params: Params, state: tuple, cache, ctx):
  """A wake pass over a window without the output head: what one sleep pass costs."""
  h, state, cache = model_lib.forward_pass(params, model_lib.embed(params, ctx), state, cache)
  return h, state, cache


def random_like(tree, key):
  """`tree` with every floating leaf replaced by small random normals (same shape and dtype)."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [0.1 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, leaves)


def boundary_input(params: Params, batch: int, key) -> streaming.StreamState:
  """What a `Stream` holds when a window ends, with random contents.

  A nonzero state, a full window cache (and under sliding eviction the retained prefix the window
  started from), wake's residual stream over the window. A boundary's cost depends on the shapes,
  not on these values.
  """
  cfg, L = params.config, params.config.window
  keys = jax.random.split(key, 4)
  state = random_like(sleep_jax.init_state(params, batch), keys[0])
  sliding = cfg.eviction == "sliding"
  cache = random_like(sleep_jax.init_cache(params, batch), keys[1])
  cache = cache.replace(length=jnp.asarray(2 * L - 1 if sliding else L, jnp.int32))
  start_cache = sleep_jax.init_cache(params, batch)
  if sliding:
    start_cache = random_like(start_cache, keys[2]).replace(length=jnp.asarray(L - 1, jnp.int32))
  hidden = jax.random.normal(keys[3], (batch, L, cfg.d_model), cfg.compute_dtype)
  tokens = jax.random.randint(keys[3], (batch, L), 1, cfg.vocab_size, jnp.int32)
  return streaming.StreamState(state=state, cache=cache, start_state=jax.tree.map(jnp.copy, state),
                               start_cache=start_cache, hidden=hidden, window_tokens=tokens)


COLUMNS = (("L", "L", "d"), ("N", "N", "d"), ("sleep_ms", "sleep ms", ".3f"),
           ("prefill_ms", "prefill ms", ".3f"), ("pass_ms", "pass ms", ".3f"),
           ("sleep_over_n_prefills", "sleep/(N prefill)", ".2f"),
           ("sleep_over_n_passes", "sleep/(N pass)", ".2f"),
           ("tokens_per_s", "consolidated tok/s", ".3g"),
           ("boundary_ms", "boundary ms", ".3f"),
           ("boundary_over_prefills", "boundary/((N-1) prefill)", ".2f"),
           ("boundary_over_passes", "boundary/((N-1) pass)", ".2f"), ("note", "note", ""))


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  results = common.Results("sleep_cost", args)
  print(common.header_line("sleep_cost"))
  base = sleep_jax.ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
                               layout=args.layout, window=args.windows[0],
                               eviction=args.eviction, delta_impl=args.delta_impl)
  weights = sleep_jax.init(base, jax.random.key(args.seed)).weights
  b = args.batch
  print(f"model: {base.layout} d={base.d_model} heads={base.num_heads}x{base.resolved_head_dim} "
        f"{base.eviction} vocab={base.vocab_size} batch={b} dtype={base.compute_dtype.name} "
        f"delta_impl={base.delta_impl}")
  rng = np.random.default_rng(args.seed)

  # Inputs and compiled functions for every window length, compiled together.
  inputs, jobs = {}, {}
  for L in args.windows:
    params = Params(weights=weights, config=base.replace(window=L))
    ss = boundary_input(params, b, jax.random.key(args.seed + L))
    windows = common.random_tokens(rng, (b, L), args.vocab, 3)
    empty = sleep_jax.init_cache(params, b)
    inputs[L] = (params, ss, windows, empty)
    jobs[(L, "prefill")] = (jax.jit(sleep_jax.wake), (params, ss.state, empty, windows[0]))
    jobs[(L, "pass")] = (one_pass, (params, ss.state, empty, windows[0]))
    for n in args.passes:
      jobs[(L, "sleep", n)] = (sleep_fn(n), (params, ss.state, windows[0]))
      jobs[(L, "boundary", n)] = (streaming._boundary,  # pylint: disable=protected-access
                                  (params, common.abstract(ss), n, True))
  all_compiled = common.compile_all(jobs, args.compile_threads)

  for L in args.windows:
    params, ss, windows, empty = inputs.pop(L)
    state = ss.state
    compiled = {k[1:] if len(k) > 2 else k[1]: v for k, v in all_compiled.items() if k[0] == L}

    def stateless(fn, *fixed):
      return lambda carry, ctx: fn(*fixed, ctx)

    chains = [(stateless(compiled["prefill"], params, state, empty), None),
              (stateless(compiled["pass"], params, state, empty), None)]
    for n in args.passes:
      chains.append((stateless(compiled[("sleep", n)], params, state), None))
      boundary = compiled[("boundary", n)]
      chains.append((lambda carry, _, fn=boundary, params=params: fn(params, carry),
                     jax.tree.map(jnp.copy, ss)))
    try:
      timings = common.time_interleaved(chains, windows, runs=args.runs, warmup=args.warmup)
    except Exception as err:  # e.g. out of memory at the longest window: keep the other rows
      results.add({"L": L, "batch": b, "note": "failed: " + common.describe_error(err, 160)})
      print(f"L={L}: failed: {common.describe_error(err, 300)}")
      continue
    prefill, one, rest = timings[0], timings[1], timings[2:]
    for i, n in enumerate(args.passes):
      sleep_t, boundary_t = rest[2 * i], rest[2 * i + 1]
      row = {"L": L, "N": n, "batch": b,
             "sleep_ms": 1e3 * sleep_t.median_s, "sleep_min_ms": 1e3 * sleep_t.min_s,
             "prefill_ms": 1e3 * prefill.median_s, "prefill_min_ms": 1e3 * prefill.min_s,
             "pass_ms": 1e3 * one.median_s, "pass_min_ms": 1e3 * one.min_s,
             "boundary_ms": 1e3 * boundary_t.median_s, "boundary_min_ms": 1e3 * boundary_t.min_s,
             "runs": args.runs,
             "tokens_per_s": b * L / sleep_t.median_s,
             "sleep_over_n_prefills": sleep_t.median_s / (n * prefill.median_s),
             "sleep_over_n_passes": sleep_t.median_s / (n * one.median_s),
             "boundary_over_prefills": common.ratio(boundary_t.median_s,
                                                    (n - 1) * prefill.median_s),
             "boundary_over_passes": common.ratio(boundary_t.median_s, (n - 1) * one.median_s),
             "compile_s": {str(k): v.compile_s for k, v in compiled.items()
                           if k in ("prefill", "pass", ("sleep", n), ("boundary", n))}}
      results.add(row)
    del chains, ss, state
    print(common.format_table([r for r in results.rows if r["L"] == L], COLUMNS))

  worst = [r["boundary_over_prefills"] for r in results.rows
           if r.get("boundary_over_prefills") is not None]
  results.summary["worst_boundary_over_prefills"] = max(worst) if worst else None
  results.summary["goal_boundary_within_1.1x_prefills"] = (max(worst) <= 1.1) if worst else None
  results.write()
  print("\n" + common.format_table(results.rows, COLUMNS))
  for name, value in results.summary.items():
    print(f"  {name}: {value:.3g}" if isinstance(value, float) else f"  {name}: {value}")
  print(f"wrote {results.path}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
