"""Data throughput on one CPU core, against the rate a GPU training step consumes it.

For each task and scale: examples generated per second (``task.examples`` on batches of the
paper's size: 512 cellular automaton, 128 multi-hop, 256 math), and batches per second of the
Grain training pipeline (``sleep_jax.data.make_train_iterator``, one prefetch thread, no worker
processes). The process is pinned to one core and rates are per CPU second of the process, so
both are per-core rates, also on a busy machine.

Consumption is estimated from the model's FLOPs: a training example costs
``sleep_jax.train_lib.train_flops_per_example`` (3 x the forward matmul FLOPs; consolidation
windows n passes, prediction windows one), for the model of the experiment config's preset, and
the GPU is assumed to deliver ``--mfu`` of ``--peak_tflops`` (40% of an H200's 989 TFLOP/s by
default). The table gives consumption at N = 1 (the worst case: least compute per example) and
at the preset's N, and the margin = generation rate / consumption rate (the target is >= 10).

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --seconds=10 --out=/tmp/data.json
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jax only counts parameters here

from absl import app
from absl import flags
import numpy as np

from sleep_jax import data
from sleep_jax import tasks
from sleep_jax import train_lib
import sleep_jax

_SECONDS = flags.DEFINE_float("seconds", 3.0, "Minimum seconds of timing per measurement.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation of the training step.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Dense bf16 peak of the GPU (H100/H200: 989).")
_CPU = flags.DEFINE_integer("cpu", None, "Core to pin to (default: the first one allowed).")
_CASES = flags.DEFINE_list("cases", None, "Subset of case labels to run (default: all).")
_OUT = flags.DEFINE_string("out", os.path.join("benchmarks", "results", "data_throughput_cpu.json"),
                           "JSON output path.")

# (label, task name, task parameters, paper batch size, experiment config and preset, eviction)
CASES = (
    ("cellular_automaton", "cellular_automaton", {}, 512, "paper", "hard"),
    ("multi_hop", "multi_hop", {}, 128, "paper", "hard"),
    ("math tiny", "math", {"scale": "tiny"}, 256, None, "hard"),  # a unit-test scale
    ("math small", "math", {"scale": "small"}, 256, "paper", "hard"),  # the paper-sized model
    ("math paper", "math", {"scale": "paper"}, 256, "paper", "hard"),
    ("math paper L=512", "math", {"scale": "paper", "window": 512}, 256, "paper", "sliding"),
)


def _rate(step, seconds: float) -> float:
  """Calls of `step()` per CPU second of this process, over at least `seconds` of CPU time.

  CPU time (all threads) rather than wall time: on one pinned core it is the per-core rate, and
  it stays honest on a machine shared with other work.
  """
  step()
  calls, start = 0, time.process_time()
  while True:
    step()
    calls += 1
    elapsed = time.process_time() - start
    if elapsed >= seconds:
      return calls / elapsed


def _model(task_name: str, preset: str, task, eviction: str):
  """The experiment preset's ModelConfig for `task`, and its number of sleep passes N."""
  import importlib

  config = importlib.import_module(f"experiments.configs.{task_name}").get_config(preset)
  fields = {k: v for k, v in config.model.to_dict().items() if v is not None}
  fields["eviction"] = eviction
  return sleep_jax.ModelConfig(vocab_size=len(task.vocab), window=task.window, **fields), config.n


def main(argv):
  del argv
  cpu = _CPU.value if _CPU.value is not None else min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})
  consumption_flops = _MFU.value * _PEAK.value * 1e12
  rows = []
  header = (f"{'case':<20} {'B':>4} {'T':>5} {'gen ex/s':>9} {'pipe b/s':>8} {'params':>7} "
            f"{'use ex/s N=1':>12} {'margin':>6} {'N':>2} {'use ex/s N':>10} {'margin':>6}")
  print(header)
  for label, name, params, batch_size, preset, eviction in CASES:
    if _CASES.value and label not in _CASES.value:
      continue
    task = tasks.get(name, **params)
    starts = iter(range(0, 1 << 40, batch_size))  # fresh indices for every call

    def generate():
      start = next(starts)
      return task.examples("train", np.arange(start, start + batch_size))

    examples_per_s = _rate(generate, _SECONDS.value) * batch_size
    iterator = data.make_train_iterator(task, batch_size, seed=0, process_index=0, process_count=1)
    batches_per_s = _rate(lambda: next(iterator), _SECONDS.value)
    row = {
        "case": label, "task": name, "params": task.params(), "batch_size": batch_size,
        "seq_len": task.seq_len, "examples_per_s": examples_per_s,
        "pipeline_batches_per_s": batches_per_s,
    }
    line = (f"{label:<20} {batch_size:>4} {task.seq_len:>5} {examples_per_s:>9.0f} "
            f"{batches_per_s:>8.1f}")
    if preset is not None:
      model, n = _model(name, preset, task, eviction)
      params_count = _count_params(model)
      use = {k: consumption_flops / train_lib.train_flops_per_example(
          model, task.consolidation_windows, k, task.seq_len) for k in (1, n)}
      row.update({
          "model": f"{model.layout} d={model.d_model}", "model_params": params_count, "n": n,
          "consumed_examples_per_s_n1": use[1], "consumed_examples_per_s_n": use[n],
          "margin_n1": examples_per_s / use[1], "margin_n": examples_per_s / use[n],
      })
      line += (f" {params_count / 1e6:>6.1f}M {use[1]:>12.0f} {row['margin_n1']:>6.1f} {n:>2} "
               f"{use[n]:>10.0f} {row['margin_n']:>6.1f}")
    rows.append(row)
    print(line, flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"cpu": platform.processor() or platform.machine(), "pinned_core": cpu,
               "mfu": _MFU.value, "peak_tflops": _PEAK.value, "rows": rows}, f, indent=2)
  print(f"wrote {_OUT.value}")


def _count_params(model) -> int:
  """Parameters of `model`, counted from abstract shapes (nothing is allocated)."""
  import jax

  shapes = jax.eval_shape(lambda: sleep_jax.init(model, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


if __name__ == "__main__":
  app.run(main)
