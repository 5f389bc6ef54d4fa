"""What every figure sweep shares: a grid of runs, each one trainer invocation in its own workdir.

A sweep module (`fig2a`, `fig2b`, `fig3`, `fig4`, `fig5`) lists its grid as `RunSpec`s; `main`
parses the common flags, then runs every spec in turn as

    python -m experiments.train --config=experiments/configs/<task>.py:<preset> \
        --config.seed=S --config.n=N ... --workdir=<root>/<figure>/<run-name>

in a subprocess (a fresh process per run: no compile cache or device memory carried over). After a
run it writes `run.json` next to the trainer's `metrics.jsonl`: the figure, grid values, seed,
resolved task parameters, the command, wall time, device and exit status; `experiments.report`
reads it. A run whose `run.json` says it finished is skipped (`--force` reruns it); an unfinished
one is rerun in the same workdir, where the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from experiments import configs

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("smoke", "small", "paper")
EXIT_PREEMPTED = 143  # the trainer's "stopped by SIGTERM, rerun to resume"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a figure's grid.

  grid: the values that define the run besides the seed, e.g. {"n": 2, "t": 32}; overrides: the
  config fields to set, dotted paths below `config` (e.g. {"task.params.t": 32}); `n` and `seed`
  are always set.
  """

  figure: str
  name: str
  task: str
  preset: str
  seed: int
  grid: dict[str, Any]
  overrides: dict[str, Any]
  variant: Optional[str] = None

  @property
  def config_arg(self) -> str:
    return self.preset + (f",{self.variant}" if self.variant else "")

  def all_overrides(self, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    items = [("seed", self.seed)] + list(self.overrides.items()) + list(extra)
    seen, out = set(), []
    for key, value in reversed(items):  # a later setting of a field wins
      if key not in seen:
        seen.add(key)
        out.append((key, value))
    return list(reversed(out))

  def command(self, root: Path, extra: Sequence[tuple[str, Any]] = ()) -> list[str]:
    config_file = _display_path(REPO_ROOT / "experiments" / "configs" / f"{self.task}.py")
    # "python" for display and run.json; run_grid swaps in this interpreter to execute.
    args = ["python", "-m", "experiments.train", f"--config={config_file}:{self.config_arg}"]
    args += [f"--config.{key}={_flag_value(value)}" for key, value in self.all_overrides(extra)]
    args.append(f"--workdir={_display_path(self.workdir(root))}")
    return args

  def workdir(self, root: Path) -> Path:
    return Path(root) / self.figure / self.name

  def resolved_config(self, extra: Sequence[tuple[str, Any]] = ()):
    """The config the trainer will see (the preset plus every override), without training."""
    config = configs.get(self.task, self.config_arg)
    for key, value in self.all_overrides(extra):
      set_field(config, key, value)
    return config


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def _display_path(path: Path) -> str:
  """`path` relative to the working directory when it lies below it (shorter commands)."""
  try:
    return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
  except ValueError:
    return str(path)


def set_field(config, dotted: str, value: Any) -> None:
  """config.a.b.c = value for dotted = "a.b.c"; ValueError naming the field if it does not exist."""
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise ValueError(f"--set: config has no field {dotted!r} (no {part!r})")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"--set: config has no field {dotted!r}")
  try:
    node[leaf] = value
  except TypeError as error:  # ml_collections refuses a value of another type
    raise ValueError(f"--set: {dotted}={value!r}: {error}") from None


def parse_ints(flag: str, text: str, low: int = 0, high: int = 1 << 30) -> tuple[int, ...]:
  """"0,1,2" -> (0, 1, 2); ValueError naming the flag on anything else."""
  try:
    values = tuple(int(part) for part in str(text).split(",") if part.strip())
  except ValueError:
    raise ValueError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None
  if not values or any(not low <= v <= high for v in values):
    raise ValueError(f"{flag} must list integers in [{low}, {high}], got {text!r}")
  return values


def parse_setting(text: str) -> tuple[str, Any]:
  """"model.d_model=64" -> ("model.d_model", 64); ints and floats are converted, "(1,8)" -> tuple."""
  key, sep, raw = text.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"--set takes FIELD=VALUE (e.g. model.d_model=64), got {text!r}")
  raw = raw.strip()
  value: Any = raw
  if raw.startswith("(") and raw.endswith(")"):
    value = tuple(int(v) for v in raw[1:-1].split(",") if v.strip())
  else:
    for kind in (int, float):
      try:
        value = kind(raw)
        break
      except ValueError:
        pass
    if raw in ("True", "False"):
      value = raw == "True"
  return key.strip(), value


def base_parser(figure: str, description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=f"python -m experiments.sweeps.{figure}",
                                   description=description)
  parser.add_argument("--preset", default="small", choices=PRESETS,
                      help="config preset of every run (default small)")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--root", default="runs", help="runs go to ROOT/%s/<run-name>/" % figure)
  parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="extra config override for every run, e.g. --set=model.d_model=64 "
                           "(repeatable)")
  parser.add_argument("--dry-run", "--dry_run", action="store_true", dest="dry_run",
                      help="print the commands and exit")
  parser.add_argument("--force", action="store_true", help="rerun runs that already finished")
  return parser


def local_device_description() -> str:
  """The devices JAX sees in this process, e.g. "1 x NVIDIA H100 80GB HBM3" or "CPU (2 cores, x86_64)"."""
  import jax

  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"
  return f"{jax.device_count()} x {device.device_kind}"


def device_description() -> str:
  """What the trainer will run on, asked of JAX in a subprocess (this process stays off devices,
  so it holds no accelerator memory the trainer needs)."""
  marker = "device: "  # other libraries may print to stdout too
  code = f"from experiments.sweeps import common; print({marker!r} + common.local_device_description())"
  try:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO_ROOT).stdout.splitlines()
  except (OSError, subprocess.TimeoutExpired):
    out = []
  found = [line[len(marker):] for line in out if line.startswith(marker)]
  return found[-1] if found else "unknown device"


def _finished(workdir: Path) -> bool:
  path = workdir / "run.json"
  if not path.is_file():
    return False
  try:
    return json.loads(path.read_text()).get("status") == "done"
  except json.JSONDecodeError:
    return False


def run_grid(specs: Sequence[RunSpec], args: argparse.Namespace,
             runner: Optional[Callable[[list[str]], int]] = None) -> int:
  """Runs (or with --dry-run prints) every spec; returns a process exit status."""
  root = Path(args.root)
  extra = [parse_setting(s) for s in args.set]
  if args.steps is not None:
    if args.steps < 0:
      raise ValueError(f"--steps must be >= 0, got {args.steps}")
    extra.append(("steps", args.steps))
  for spec in specs:  # fail on a bad override before anything trains
    spec.resolved_config(extra)
  if args.dry_run:
    for spec in specs:
      print(shlex.join(spec.command(root, extra)))
    return 0
  runner = runner or (lambda cmd: subprocess.run(cmd, cwd=REPO_ROOT).returncode)
  device = device_description()
  failed = []
  for index, spec in enumerate(specs, 1):
    workdir = spec.workdir(root)
    if _finished(workdir) and not args.force:
      print(f"[{index}/{len(specs)}] {spec.figure}/{spec.name}: finished before, skipped")
      continue
    command = spec.command(root, extra)
    # The subprocess runs in the repository root: this interpreter, an absolute workdir.
    command[0], command[-1] = sys.executable, f"--workdir={workdir.resolve()}"
    print(f"[{index}/{len(specs)}] {shlex.join(spec.command(root, extra))}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    status = runner(command)
    wall = time.time() - start
    config = spec.resolved_config(extra)
    info = {
        "figure": spec.figure, "name": spec.name, "task": spec.task, "preset": spec.preset,
        "variant": spec.variant, "seed": spec.seed, "grid": spec.grid,
        "task_params": config.task.params.to_dict(), "steps": config.steps,
        "overrides": {k: v for k, v in spec.all_overrides(extra)},
        "command": shlex.join(spec.command(root, extra)), "wall_s": round(wall, 1),
        "device": device, "returncode": status,
        "status": "done" if status == 0 else ("preempted" if status == EXIT_PREEMPTED else "failed"),
    }
    (workdir / "run.json").write_text(json.dumps(info, indent=2, default=list) + "\n")
    if status == EXIT_PREEMPTED:
      print(f"{spec.name}: stopped by SIGTERM; rerun the same command to resume", file=sys.stderr)
      return EXIT_PREEMPTED
    if status != 0:
      failed.append(spec.name)
  if failed:
    print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1
  print(f"done; tables and plots: python -m experiments.report --runs={_display_path(root)} "
        "--out=docs/results")
  return 0


def main(figure: str, description: str, add_flags: Callable[[argparse.ArgumentParser], None],
         make_specs: Callable[[argparse.Namespace, tuple[int, ...]], list[RunSpec]],
         argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of a sweep module: flags, grid, then run_grid."""
  parser = base_parser(figure, description)
  add_flags(parser)
  args = parser.parse_args(argv)
  try:
    seeds = parse_ints("--seeds", args.seeds)
    specs = make_specs(args, seeds)
    return run_grid(specs, args)
  except ValueError as error:
    parser.error(str(error))
    return 2  # not reached: parser.error exits
