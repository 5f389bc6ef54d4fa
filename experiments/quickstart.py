r"""The main command: train a small Rule 110 model without sleep (N = 1) and with it, on the CPU.

    python -m experiments.quickstart                    # the calibrated setting (see below)
    python -m experiments.quickstart --seeds=0,1,2 --ns=1,2,4
    python -m experiments.quickstart --tiny --steps=2   # seconds: checks the pipeline only

Each (N, seed) is one `experiments.train.train` run of the Rule 110 task (the paper's section 4)
in its own workdir under `--workdir` (default: a new temporary folder). Every N sees the same data
order and the same initial weights for a given seed. At the end it prints the test accuracy per N
next to chance, says whether N > 1 beat N = 1 in every seed, and saves a plot of accuracy against
training step (mean over seeds, band = sample std across seeds).

The default setting (`QUICKSTART` below) came out of a calibration on 2 CPU cores (every setting
tried is listed in docs/results.md). No setting we could train in minutes showed the sleep
effect: where one pass cannot solve the task (t = 6 on 12 cells), neither N = 1 nor N = 2 got off
chance within 500 steps, and over 1,500 steps N = 1 stayed slightly ahead; where it can,
N = 1 learned faster per step. The default is the cheapest setting where both learn well above
chance, so the table compares two trained models. Which N comes out ahead there is not stable:
changes that alter only the float32 rounding of the fast-weight op moved a single run's final
exact accuracy by up to 0.2, and the two-seed verdict flipped between versions (docs/results.md),
so with fewer than MIN_SEEDS seeds the verdict says it cannot tell. It is a demonstration at toy
scale, not a reproduction of the paper's Fig. 2b (t = 32, width 24, d = 256, batch 512, 20k
steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments import configs
from experiments import report
from experiments.sweeps import common

TASK = "cellular_automaton"

# The calibrated setting (docs/results.md, "Quickstart and calibration") is the `small` preset of
# experiments/configs/cellular_automaton.py (Rule 110, t = 4, 2 states of 12 cells, `AGAG` d = 64,
# batch 64, Muon 1e-2 / AdamW 1e-3) trained for fewer steps. These are the fields it changes, as
# dotted paths below the trainer's config.
QUICKSTART: dict[str, Any] = {
    "steps": 400,
    "eval_every": 100,
    "eval_examples": 256,
    "checkpoint_every": 100_000,  # one checkpoint at the end: saving costs CPU time here
    "log_every": 50,
}
DEFAULT_NS = "1,2"
DEFAULT_SEEDS = "0,1"
EXIT_PREEMPTED = common.EXIT_PREEMPTED  # a run was stopped by SIGTERM; rerun to resume

# --tiny: the smoke preset (a two-block d = 32 model, batch 8); only checks that everything runs.
TINY: dict[str, Any] = {"eval_examples": 16, "eval_every": 0, "checkpoint_every": 100_000}


def build_config(n: int, seed: int, *, tiny: bool, steps: Optional[int],
                 extra: Sequence[tuple[str, Any]] = ()):
  """The trainer config of one quickstart run."""
  config = configs.get(TASK, "smoke" if tiny else "small")
  for key, value in list((TINY if tiny else QUICKSTART).items()) + list(extra):
    common.set_field(config, key, value)
  config.n = n
  config.seed = seed
  if steps is not None:
    config.steps = steps
  return config


def run_one(config, workdir: Path, n: int, seed: int) -> tuple[float, bool]:
  """Trains one run in-process; returns its wall time in seconds and whether it finished.

  A run stopped early (SIGTERM: the trainer saves a checkpoint and returns) is recorded as
  "preempted" in its run.json and is resumed, not restarted, by a rerun with the same --workdir.
  """
  from absl import logging

  from experiments import train

  logging.set_verbosity(logging.WARNING)  # the quickstart prints its own progress
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  result = train.train(config, str(workdir))
  wall = time.time() - start
  finished = not result["preempted"]
  info = {"figure": "quickstart", "name": workdir.name, "task": TASK, "seed": seed,
          "grid": {"n": n, "t": config.task.params.t}, "task_params": config.task.params.to_dict(),
          "steps": config.steps, "wall_s": round(wall, 1),
          "device": common.local_device_description(),
          "status": "done" if finished else "preempted", "stopped_at_step": result["step"]}
  (workdir / "run.json").write_text(json.dumps(info, indent=2, default=list) + "\n")
  return wall, finished


def summarize(runs: Sequence[report.Run], ns: Sequence[int]) -> dict[int, dict[str, Any]]:
  """Per N: final exact and per-label accuracy stats, and the per-seed exact accuracies."""
  out = {}
  for n in ns:
    group = [r for r in runs if r.grid.get("n") == n]
    out[n] = {
        "exact": report.final_stat(group, "eval/all/exact"),
        "accuracy": report.final_stat(group, "eval/all/accuracy"),
        "per_seed": {r.seed: r.final("eval/all/exact") for r in group},
    }
  return out


# Fewer seeds than this cannot separate N from N = 1 here: rounding alone moves a run by about
# 0.2 exact accuracy, as much as the gaps seen between N = 1 and N = 2 (docs/results.md).
MIN_SEEDS = 3


def verdict(summary: dict[int, dict[str, Any]], chance_exact: float) -> list[str]:
  """Plain sentences on whether sleep helped, seed by seed; with fewer than MIN_SEEDS seeds a
  one-sided result is reported as such, not as an effect."""
  if 1 not in summary:
    return ["(no N = 1 run to compare against)"]
  base = summary[1]["per_seed"]
  lines = []
  for n, entry in summary.items():
    if n == 1:
      continue
    seeds = sorted(set(base) & set(entry["per_seed"]))
    diffs = [entry["per_seed"][s] - base[s] for s in seeds
             if entry["per_seed"][s] is not None and base[s] is not None]
    if not diffs:
      continue
    wins = sum(d > 0 for d in diffs)
    mean_diff = sum(diffs) / len(diffs)
    too_few = (f"; {len(diffs)} seed{'s' if len(diffs) > 1 else ''} cannot tell that from "
               f"run-to-run spread at this scale (float32 rounding alone moved one run by about "
               f"0.2, docs/results.md): run at least {MIN_SEEDS} (--seeds=0,1,2) before reading "
               "anything into it.")
    if wins == len(diffs) and len(diffs) == 1:
      text = (f"N={n} beat N=1 ({mean_diff:+.3f}) with a single seed" + too_few)
    elif wins == len(diffs):
      text = (f"N={n} beat N=1 in all {len(diffs)} seeds (exact accuracy {mean_diff:+.3f} on "
              "average)" + (too_few if len(diffs) < MIN_SEEDS else
                            ": the sleep effect is visible here."))
    elif wins == 0:
      text = (f"N={n} did not beat N=1 in any of {len(diffs)} seed{'s' if len(diffs) > 1 else ''} "
              f"(exact accuracy {mean_diff:+.3f} on average)" +
              (too_few if len(diffs) < MIN_SEEDS else
               ": no sleep effect at this scale and budget."))
    else:
      text = (f"N={n} beat N=1 in {wins} of {len(diffs)} seeds only (exact accuracy "
              f"{mean_diff:+.3f} on average): no reliable sleep effect at this scale and budget.")
    lines.append(text)
  base_stat = summary[1]["exact"]
  if base_stat is not None and base_stat.mean < chance_exact + 0.05:
    lines.append(f"N=1 stayed near chance ({base_stat.mean:.3f} vs {chance_exact:.3f}): one pass "
                 "over each window was not enough at this depth t.")
  return lines


def plot(runs: Sequence[report.Run], ns: Sequence[int], chance: dict[str, float], title: str,
         path: Path) -> None:
  plt = report._plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, metric, label in ((axes[0], "exact", "exact accuracy (all labels right)"),
                            (axes[1], "accuracy", "per-label accuracy")):
    for n in ns:
      group = [r for r in runs if r.grid.get("n") == n]
      steps, mean, std = report.curve(group, f"eval/all/{metric}")
      if not len(steps):
        continue
      line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"N={n} ({len(group)} seed{'s' if len(group) > 1 else ''})")
      if len(group) > 1:
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if metric in chance:
      ax.axhline(chance[metric], color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"test {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.quickstart",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--ns", default=DEFAULT_NS, help=f"sleep passes N to compare "
                      f"(default {DEFAULT_NS})")
  parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"seeds (default {DEFAULT_SEEDS})")
  parser.add_argument("--steps", type=int, default=None, help="training steps per run "
                      f"(default {QUICKSTART['steps']}; smoke preset's with --tiny)")
  parser.add_argument("--tiny", action="store_true",
                      help="the smoke preset (a d = 32 two-block model): checks the pipeline only")
  parser.add_argument("--workdir", default=None,
                      help="folder for the runs and the plot (default: a new temporary folder); "
                           "runs already finished in it are not retrained")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field of every run, e.g. --set=task.params.t=8")
  args = parser.parse_args(argv)
  try:
    ns = common.parse_ints("--ns", args.ns, 1, 1024)
    seeds = common.parse_ints("--seeds", args.seeds)
    if args.steps is not None and args.steps < 1:
      raise ValueError(f"--steps must be an integer >= 1, got {args.steps}")
    extra = [common.parse_setting(s) for s in args.set]
    probe = build_config(ns[0], seeds[0], tiny=args.tiny, steps=args.steps, extra=extra)
    from experiments import train
    train.validate(probe)  # a bad --set fails here, before anything trains
  except ValueError as error:
    parser.error(str(error))

  root = Path(args.workdir or tempfile.mkdtemp(prefix="sleep_quickstart_"))
  root.mkdir(parents=True, exist_ok=True)
  p = probe.task.params
  title = (f"Rule 110, t={p.t}, width={p.width}, {p.states} states, "
           f"{probe.model.layout} d={probe.model.d_model}, batch {probe.batch_size}, "
           f"{probe.steps} steps")
  print(f"{title}; N in {list(ns)}, seeds {list(seeds)}; runs in {root}", flush=True)
  start = time.time()
  for n in ns:
    for seed in seeds:
      config = build_config(n, seed, tiny=args.tiny, steps=args.steps, extra=extra)
      print(f"  training N={n} seed={seed} ...", end=" ", flush=True)
      wall, finished = run_one(config, root / f"n{n}_seed{seed}", n, seed)
      print(f"{wall:.0f} s", flush=True)
      if not finished:
        # No table from a partial run: it would compare models trained for different budgets.
        print(f"N={n} seed={seed} was stopped (SIGTERM) before step {config.steps}; its "
              f"checkpoint is in {root / f'n{n}_seed{seed}'}. To resume, rerun the same command "
              f"with --workdir={root}", file=sys.stderr)
        return EXIT_PREEMPTED
  total = time.time() - start

  runs = [report.describe(root / f"n{n}_seed{seed}") for n in ns for seed in seeds]
  chance = runs[0].chance
  summary = summarize(runs, ns)
  print()
  print(f"{title}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, {total:.0f} s on CPU")
  head_exact = f"exact acc (chance {chance['exact']:.4g})"
  head_label = f"per-label acc (chance {chance['accuracy']:.4g})"
  print(f"{'N':<4}{head_exact:<30}{head_label}")
  for n in ns:
    exact, label = summary[n]["exact"], summary[n]["accuracy"]
    print(f"{n:<4}{exact.text() if exact else 'n/a':<30}{label.text() if label else 'n/a'}")
  if not args.tiny:
    for line in verdict(summary, chance["exact"]):
      print(line)
  else:
    print("(--tiny: a pipeline check; the numbers mean nothing)")
  plot_path = root / "quickstart.png"
  plot(runs, ns, chance, title, plot_path)
  print(f"plot: {plot_path}")
  if not args.tiny:
    print("What the paper reports, and every setting tried at this scale: docs/results.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
