"""Memory of attention on a TPU chip, XLA against the splash kernel, compiled ahead of time.

No TPU is needed: `libtpu` compiles for a TPU topology from any host (as `experiments.aot` does
for the whole train step), and the compiled program reports the temporaries it needs. Rows:
implementation (`xla`: `jax.nn.dot_product_attention`; `splash`:
`sleep_jax.attention.splash_attention`) x mask (`causal`; `sliding`, a window of `--window`
tokens) x T x D, each the forward and backward of one call over [B T H D] bfloat16 inputs (the
training case) on one chip. Where the TPU compiler refuses the program (its temporaries exceed
HBM), the row gives the compiler's own count and "does not fit". Time is not measured: that needs
a TPU. Run from the repository root (needs `pip install -e '.[tpu]'`):

    JAX_PLATFORMS=cpu python -m benchmarks.attention_tpu_memory --topology=v5e-1
    JAX_PLATFORMS=cpu python -m benchmarks.attention_tpu_memory --seq_lens=2048 --head_dims=128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from sleep_jax import attention
from experiments import aot

from benchmarks import common

IMPLS = ("xla", "splash")
MASKS = ("causal", "sliding")
MIB = 2 ** 20


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e-1",
                      help="TPU topology as experiments.aot takes it; one chip is compiled for "
                      "(default %(default)s)")
  parser.add_argument("--seq_lens", help="T values (default 2048,8192)")
  parser.add_argument("--head_dims", help="D values (default 64,128)")
  parser.add_argument("--batch", type=int, default=4, help="B (default %(default)s)")
  parser.add_argument("--heads", type=int, default=8, help="H (default %(default)s)")
  parser.add_argument("--window", type=int, default=512,
                      help="L of the sliding rows (default %(default)s)")
  parser.add_argument("--out_dir", default=common.RESULTS_DIR,
                      help="folder of attention_tpu_memory_<topology>.json (default %(default)s)")
  parser.add_argument("--out", default=None, help="JSON path; overrides --out_dir")
  args = parser.parse_args(argv)
  args.seq_lens = common.int_list("--seq_lens", args.seq_lens, (2048, 8192))
  args.head_dims = common.int_list("--head_dims", args.head_dims, (64, 128))
  common.check_int("--batch", args.batch, 1)
  common.check_int("--heads", args.heads, 1)
  common.check_int("--window", args.window, 1)
  args.out = args.out or os.path.join(args.out_dir, f"attention_tpu_memory_{args.topology}.json")
  return args


def gradient_fn(impl: str, mask: str, window: int):
  """(q, k, v) -> gradients of sum(attention(q, k, v)) with respect to all three."""
  local = None if mask == "causal" else window

  def attend(q, k, v):
    if impl == "splash":
      return attention.splash_attention(q, k, v, window=local)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        local_window_size=None if local is None else
                                        (local - 1, 0))

  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))


COLUMNS = (("impl", "impl", ""), ("mask", "mask", ""), ("T", "T", "d"), ("D", "D", "d"),
           ("temp_mib", "temporaries MiB", ".1f"), ("fits", "fits", ""),
           ("compile_s", "compile s", ".1f"))


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  topology = aot.parse_topology(args.topology)
  device = aot.topology_devices(topology)[0]
  results = common.Results("attention_tpu_memory", args)
  results.meta.update(topology=args.topology, tpu=device.device_kind, hbm_gib=topology.chip.hbm_gib)
  print(f"== attention_tpu_memory: {device.device_kind} ({args.topology}, one chip, "
        f"{topology.chip.hbm_gib} GiB HBM) B={args.batch} H={args.heads} L={args.window} "
        f"bfloat16, forward+backward, jax={jax.__version__}")
  on_chip = jax.sharding.SingleDeviceSharding(device)
  for t in args.seq_lens:
    for d in args.head_dims:
      shape = jax.ShapeDtypeStruct((args.batch, t, args.heads, d), jnp.bfloat16, sharding=on_chip)
      for mask in MASKS:
        for impl in IMPLS:
          row = {"impl": impl, "mask": mask, "T": t, "D": d, "B": args.batch, "H": args.heads,
                 "window": args.window if mask == "sliding" else None}
          start = time.perf_counter()
          try:
            compiled = gradient_fn(impl, mask, args.window).lower(shape, shape, shape).compile()
            row["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / MIB
            row["fits"] = True
          except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
              raise
            gib = aot.gib_in(str(err), "HLO temporaries")
            row["temp_mib"] = None if gib is None else gib * 1024
            row["fits"] = False
          row["compile_s"] = time.perf_counter() - start
          results.add(row)
          print(common.format_table([row], COLUMNS))
  print("\n" + common.format_table(results.rows, COLUMNS))
  print(f"wrote {results.path}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
