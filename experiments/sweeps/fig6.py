r"""Fig. 6: training throughput (tokens per second) against N and the window length L.

    python -m experiments.sweeps.fig6 --preset=small --root=runs
    python -m experiments.sweeps.fig6 --preset=paper --ns=1,2,4,8 --windows=512,2048,8192 --root=runs

For every (L, N) this builds the preset's model (from `experiments/configs/<task>.py`, default the
math task, whose window the paper varies) with window L, and times the same update the trainer
runs: the gradient of `sleep_jax.loss` (Algorithm 1, full BPTT, the preset's remat policy) and
the Muon + AdamW step of `sleep_jax.optim`. Examples are `--windows_per_example` windows of random
tokens, all consolidation windows but the last (a prediction window with every position
supervised), so the cost of sleep is what varies. The batch holds `--tokens_per_step` tokens, so
every L trains on the same number of tokens per step. After one compile and `--warmup` steps, each
of `--repeats` timings covers `--steps` steps (inputs rotated, results blocked on).

Writes `<root>/fig6/throughput.json` (one record per repeat) for `experiments.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from experiments import configs
from experiments.sweeps import common

FIGURE = "fig6"
DEFAULTS = {  # preset -> (ns, windows, tokens per step)
    "smoke": ("1,2", "16,32", 256),
    "small": ("1,2,4", "32,128,512", 8192),
    "paper": ("1,2,4,8", "512,2048,8192", 65536),
}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.sweeps.fig6",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small", choices=common.PRESETS)
  parser.add_argument("--task", default="math", choices=sorted(configs.TASK_CONFIGS),
                      help="config file whose preset model is timed (default math)")
  parser.add_argument("--ns", default=None, help="sleep passes N (preset default)")
  parser.add_argument("--windows", default=None, help="window lengths L (preset default)")
  parser.add_argument("--tokens_per_step", type=int, default=None,
                      help="tokens per training step; the batch is this / (L * windows)")
  parser.add_argument("--windows_per_example", type=int, default=4,
                      help="windows per example, the last one a prediction window (default 4)")
  parser.add_argument("--steps", type=int, default=5, help="steps per timing (default 5)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--repeats", type=int, default=3, help="timings per (L, N) (default 3)")
  parser.add_argument("--root", default="runs", help="writes ROOT/fig6/throughput.json")
  parser.add_argument("--dry-run", "--dry_run", action="store_true", dest="dry_run",
                      help="print the grid and exit")
  args = parser.parse_args(argv)
  ns, windows, tokens = DEFAULTS[args.preset]
  try:
    args.ns = common.parse_ints("--ns", args.ns or ns, 1, 1024)
    args.windows = common.parse_ints("--windows", args.windows or windows, 2, 1 << 20)
    for flag, value, low in (("--windows_per_example", args.windows_per_example, 2),
                             ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--repeats", args.repeats, 1)):
      if value < low:
        raise ValueError(f"{flag} must be an integer >= {low}, got {value}")
    args.tokens_per_step = args.tokens_per_step or tokens
    if args.tokens_per_step < 1:
      raise ValueError(f"--tokens_per_step must be >= 1, got {args.tokens_per_step}")
  except ValueError as error:
    parser.error(str(error))
  return args


def batch_size(tokens_per_step: int, window: int, windows_per_example: int) -> int:
  return max(1, tokens_per_step // (window * windows_per_example))


def time_train_step(model_config, n: int, batch: int, windows_per_example: int, optim_config,
                    steps: int, warmup: int, repeats: int, seed: int = 0) -> list[dict]:
  """Seconds per update of the trainer's step at (model_config, n); one record per repeat."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import sleep_jax
  from sleep_jax import optim

  window = model_config.window
  seq = window * windows_per_example
  layout = (True,) * (windows_per_example - 1) + (False,)
  params = sleep_jax.init(model_config, jax.random.key(seed))
  tx = optim.make_optimizer(muon_lr=optim_config.muon_lr, adam_lr=optim_config.adam_lr,
                            weight_decay=optim_config.weight_decay,
                            clip_norm=optim_config.clip_norm)
  opt_state = tx.init(params.weights)

  def loss_fn(weights, batch):
    p = sleep_jax.Params(weights=weights, config=model_config)
    return sleep_jax.loss(p, batch, n, consolidation_windows=layout)

  @jax.jit
  def step(weights, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights, batch)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, seq), bool)
  mask[:, -window:] = True

  def make_batch():
    tokens = rng.integers(1, model_config.vocab_size, (batch, seq), dtype=np.int32)
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
            "loss_mask": jnp.asarray(mask)}

  batches = [make_batch() for _ in range(3)]  # rotated so no step sees the previous one's input
  weights = params.weights
  start = time.perf_counter()
  weights, opt_state, loss = step(weights, opt_state, batches[0])
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    weights, opt_state, loss = step(weights, opt_state, batches[i % 3])
  loss.block_until_ready()
  records = []
  for repeat in range(repeats):
    start = time.perf_counter()
    for i in range(steps):
      weights, opt_state, loss = step(weights, opt_state, batches[i % 3])
    loss.block_until_ready()
    seconds = (time.perf_counter() - start) / steps
    records.append({"n": n, "window": window, "batch": batch, "seq_len": seq, "repeat": repeat,
                    "step_s": seconds, "tokens_per_sec": batch * seq / seconds,
                    "compile_s": compile_s, "loss": float(loss)})
  return records


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  base = configs.get(args.task, args.preset)
  grid = [(w, n) for w in args.windows for n in args.ns]
  if args.dry_run:
    for window, n in grid:
      batch = batch_size(args.tokens_per_step, window, args.windows_per_example)
      print(f"L={window} N={n} batch={batch} T={window * args.windows_per_example} "
            f"model={base.model.layout} d={base.model.d_model}")
    return 0

  import jax

  import sleep_jax
  from sleep_jax import tasks

  task = tasks.get(base.task.name, **{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in base.task.params.to_dict().items()
                                      if v is not None})
  model_fields = dict(base.model.to_dict())
  device_text = common.local_device_description()
  out_dir = Path(args.root) / FIGURE
  out_dir.mkdir(parents=True, exist_ok=True)
  records = []
  result = {
      "preset": args.preset, "task": args.task, "device": device_text,
      "model": f"{base.model.layout} d={base.model.d_model} heads={base.model.num_heads}",
      "tokens_per_step": args.tokens_per_step, "windows_per_example": args.windows_per_example,
      "steps_per_timing": args.steps, "jax": jax.__version__, "records": records,
  }
  for window, n in grid:
    config = sleep_jax.ModelConfig(vocab_size=len(task.vocab), window=window, **model_fields)
    batch = batch_size(args.tokens_per_step, window, args.windows_per_example)
    new = time_train_step(config, n, batch, args.windows_per_example, base.optim, args.steps,
                          args.warmup, args.repeats, seed=0)
    records += new
    best = min(r["step_s"] for r in new)
    print(f"L={window:6d} N={n:3d} batch={batch:5d}  {batch * window * args.windows_per_example / best:12,.0f} "
          f"tokens/s  ({best * 1e3:.1f} ms/step, compile {new[0]['compile_s']:.1f} s)", flush=True)
    (out_dir / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out_dir / 'throughput.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
