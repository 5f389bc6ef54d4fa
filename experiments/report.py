r"""Turns training workdirs into the paper's figures: markdown tables and PNG plots.

    python -m experiments.report --runs=runs --out=docs/results
    python -m experiments.report --runs runs/fig2b runs/fig3 --out=docs/results

A workdir is any folder that holds a `metrics.jsonl` written by `experiments.train` (one JSON
object per line: `step`, training `loss`, ..., and evaluations `eval/<group>/<metric>` such as
`eval/t=32/exact` or `eval/k=4/loss`). `--runs` may name workdirs or folders above them; they are
found recursively. What a run is (its figure, N, seed and grid values) is read from, in order:

1. `run.json`, written next to `metrics.jsonl` by `experiments.sweeps`;
2. `config.json`, written by the trainer (the figure is then the parent folder's name when that is
   a figure name such as `fig2b`, otherwise it is guessed from the task);
3. the folder names alone (`.../<figure>/n2_t32_seed0`: `n<N>`, `seed<S>`, `t<t>`, `hard` /
   `sliding`), when neither file exists.

Each table says which source it used. Runs that differ only in their seed are one setting: curves
and table cells show the mean over seeds, and error bars and `±` the sample standard deviation
(ddof = 1) across seeds. A setting with one seed has no error bar. Throughput files
(`throughput.json`, written by `experiments.sweeps.fig6`) become the Fig. 6 table and plot.

Outputs in `--out`: `<figure>.md` and `<figure>.png` per figure found, and `summary.json` with
every number in the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
THROUGHPUT_FILE = "throughput.json"

_EVAL_KEY = re.compile(r"^eval/([^/]+)/([^/]+)$")


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class Figure:
  """How one paper figure is drawn.

  kind: "curves" (an eval metric against training step, one curve per `series` value),
  "per_group" (one panel per eval group, e.g. hop count k, curves per `series`), "final_by_group"
  (the final metric against the eval group, e.g. ops, one line per `series`), "throughput".
  """

  name: str
  title: str
  task: Optional[str]
  kind: str
  series: str          # the grid value that tells curves apart: "t", "n", ...
  metric: str          # main metric: "exact", "loss", "accuracy", "tokens_per_sec"
  paper: str           # what the paper reports (its section 6 and our SPEC's table)


FIGURES = {
    "fig2a": Figure(
        "fig2a", "Fig. 2a: Rule 110 at N = 1, exact accuracy while training, per depth t",
        "cellular_automaton", "curves", "t", "exact",
        "accuracy is reached later and ends lower as t grows (t in 4..16); t = 4 and 8 are "
        "learned fast"),
    "quickstart": Figure(
        "quickstart", "Quickstart: Rule 110 at toy scale, exact accuracy while training, per N",
        "cellular_automaton", "curves", "n", "exact",
        "no counterpart; a toy version of Fig. 2b (the paper: t = 32, 24 cells, 4 states)"),
    "fig2b": Figure(
        "fig2b", "Fig. 2b: Rule 110 at fixed t, exact accuracy while training, per N",
        "cellular_automaton", "curves", "n", "exact",
        "t = 32: exact accuracy about 10% (near chance) at N = 1, about 20% at N = 2, above 30% "
        "at N = 3 and N = 4"),
    "fig3": Figure(
        "fig3", "Fig. 3: multi-hop retrieval, eval loss per hop count k while training, per N",
        "multi_hop", "per_group", "n", "loss",
        "every N learns k = 1, 2; N = 1 stalls from k = 4, N = 2 from k = 8; only N = 4 starts "
        "to learn k = 16"),
    "fig4": Figure(
        "fig4", "Fig. 4: math word problems, hard eviction, final accuracy per number of ops",
        "math", "final_by_group", "n", "accuracy",
        "hard eviction, L = 2000, pretrained models: 6 ops 0.742 -> 0.812 (Jet-Nemotron, "
        "N = 1 -> 6), 0.419 -> 0.615 (Ouro, N = 1 -> 4); 8 ops 0.351 -> 0.388 and 0.210 -> "
        "0.272; 2-4 ops saturate"),
    "fig5": Figure(
        "fig5", "Fig. 5: math word problems, sliding eviction, final accuracy per number of ops",
        "math", "final_by_group", "n", "accuracy",
        "sliding eviction, L = 512, N = 1 / 2 / 4: 2 ops 0.596 / 0.823 / 0.905; 4 ops 0.839 / "
        "0.892 / 0.926; 6 ops 0.251 / 0.265 / 0.320; 8 ops 0.116 / 0.118 / 0.137"),
    "fig6": Figure(
        "fig6", "Fig. 6: training throughput against N, per window length L",
        None, "throughput", "window", "tokens_per_sec",
        "throughput falls roughly as 1/N; long windows keep the accelerator busy"),
}

# Grid values a run may carry, in the order tables list them.
GRID_KEYS = ("n", "t", "eviction", "window", "layout", "d_model", "grad_passes", "variant")


# ----------------------------------------------------------------------------- reading runs


@dataclasses.dataclass
class Run:
  """One workdir: what it is, and its metric history."""

  name: str                      # the workdir's folder name
  figure: str
  task: Optional[str]
  seed: Optional[int]
  grid: dict[str, Any]           # grid values other than the seed (GRID_KEYS order)
  source: str                    # where `figure`/`grid`/`seed` came from
  history: dict[int, dict]       # step -> merged record
  chance: dict[str, float]       # metric -> chance level, when known
  preset: Optional[str] = None
  wall_s: Optional[float] = None
  device: Optional[str] = None
  target_steps: Optional[int] = None  # the run's configured step count, when known
  status: Optional[str] = None        # run.json's status ("done", "preempted", "failed")

  @property
  def unfinished(self) -> Optional[str]:
    """Why the run is not a finished run ("step 25 of 800", "preempted at step 351 of 400"),
    or None when it finished or nothing says otherwise (a bare metrics.jsonl). run.json's
    status decides when there is one; otherwise the last logged step against config.json's
    `steps` (a compute-matched run logs more steps than that, never fewer)."""
    if self.status is not None:  # run.json: the sweep runner saw the trainer's exit status
      if self.status == "done":
        return None
      return f"{self.status} at step {self.last_step()}" + (
          f" of {self.target_steps}" if self.target_steps else "")
    if self.target_steps and self.last_step() < self.target_steps:
      return f"step {self.last_step()} of {self.target_steps}"
    return None

  def setting(self) -> tuple:
    return tuple(sorted(self.grid.items()))

  def eval_steps(self, key: str) -> list[int]:
    return sorted(s for s, r in self.history.items() if _finite(r.get(key)))

  def final(self, key: str) -> Optional[float]:
    steps = self.eval_steps(key)
    return float(self.history[steps[-1]][key]) if steps else None

  def last_step(self) -> int:
    return max(self.history) if self.history else 0

  def groups(self) -> list[str]:
    """Eval groups seen in the history, e.g. ["k=1", "k=2", "all"], groups sorted by value."""
    found = set()
    for record in self.history.values():
      for key in record:
        match = _EVAL_KEY.match(key)
        if match:
          found.add(match.group(1))
    return sorted(found, key=_group_sort_key)


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group_sort_key(group: str):
  name, _, value = group.partition("=")
  try:
    return (0, name, float(value))
  except ValueError:
    return (1, group, 0.0)


def read_metrics(path: Path) -> dict[int, dict]:
  """`metrics.jsonl` -> {step: record}, records of one step merged (later lines win).

  Unreadable lines (a run killed mid-write) are skipped; a line without an integer `step` is an
  error, since every line the trainer writes has one.
  """
  history: dict[int, dict] = {}
  for number, line in enumerate(path.read_text().splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
      raise ValueError(f"{path}:{number}: every record needs an integer 'step', got {line[:80]!r}")
    history.setdefault(step, {}).update(record)
  return history


def find_workdirs(paths: Iterable[str | Path]) -> list[Path]:
  """Every folder at or under `paths` holding a metrics.jsonl, sorted."""
  found = set()
  for path in paths:
    path = Path(path)
    if not path.exists():
      raise ValueError(f"--runs: {path} does not exist")
    if (path / METRICS_FILE).is_file():
      found.add(path)
    found.update(p.parent for p in path.rglob(METRICS_FILE))
  return sorted(found)


def find_throughput_files(paths: Iterable[str | Path]) -> list[Path]:
  found = set()
  for path in paths:
    path = Path(path)
    if path.is_file() and path.name == THROUGHPUT_FILE:
      found.add(path)
    elif path.is_dir():
      found.update(path.rglob(THROUGHPUT_FILE))
  return sorted(found)


def _load_json(path: Path) -> Optional[dict]:
  if not path.is_file():
    return None
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError:
    return None
  return value if isinstance(value, dict) else None


def _grid_from_config(config: dict) -> tuple[dict, Optional[int], Optional[str], dict]:
  """(grid, seed, task name, task params) from a trainer's config.json."""
  task = config.get("task") or {}
  params = task.get("params") or {}
  model = config.get("model") or {}
  grid = {"n": config.get("n")}
  if task.get("name") == "cellular_automaton":
    grid["t"] = params.get("t")
  if model.get("eviction") is not None:
    grid["eviction"] = model["eviction"]
  if params.get("window") is not None:
    grid["window"] = params["window"]
  for key in ("layout", "d_model"):
    if model.get(key) is not None:
      grid[key] = model[key]
  if config.get("grad_passes") is not None:
    grid["grad_passes"] = config["grad_passes"]
  if config.get("compute_match_n") is not None:
    # N = 1 trained for the FLOPs of N = compute_match_n: not the same setting as plain N = 1.
    grid["variant"] = f"compute-matched to N={config['compute_match_n']}"
  return grid, config.get("seed"), task.get("name"), params


_NAME_PARTS = {
    "n": re.compile(r"^n(\d+)$"), "seed": re.compile(r"^seed(\d+)$"),
    "t": re.compile(r"^t(\d+)$"), "window": re.compile(r"^[lL](\d+)$"),
}


def _grid_from_name(name: str) -> tuple[dict, Optional[int]]:
  grid, seed = {}, None
  for part in re.split(r"[_\-]", name):
    if part in ("hard", "sliding"):
      grid["eviction"] = part
      continue
    for key, pattern in _NAME_PARTS.items():
      match = pattern.match(part)
      if match:
        if key == "seed":
          seed = int(match.group(1))
        else:
          grid[key] = int(match.group(1))
  return grid, seed


def _chance(task: Optional[str], params: dict) -> dict[str, float]:
  """Chance levels of the main metrics, from the task's parameters."""
  if task == "cellular_automaton":
    states = params.get("states") or 4
    return {"exact": 0.5 ** int(states), "accuracy": 0.5}
  if task == "math":
    modulus = params.get("modulus") or 23
    return {"accuracy": 1.0 / int(modulus), "exact": 1.0 / int(modulus)}
  if task == "multi_hop":
    nodes = params.get("num_nodes")
    if nodes:
      return {"accuracy": 1.0 / int(nodes)}
  return {}


def _guess_figure(task: Optional[str], parent: str) -> str:
  if parent in FIGURES:
    return parent
  return {"cellular_automaton": "fig2b", "multi_hop": "fig3", "math": "fig4"}.get(task or "", parent)


def describe(workdir: Path) -> Run:
  """Reads one workdir into a Run (see the module docstring for the order of sources)."""
  history = read_metrics(workdir / METRICS_FILE)
  run_info = _load_json(workdir / RUN_FILE)
  config = _load_json(workdir / CONFIG_FILE)
  parent = workdir.parent.name
  task, params, preset, wall, device, status = None, {}, None, None, None, None
  target = config.get("steps") if config is not None else None
  if config is not None:
    grid, seed, task, params = _grid_from_config(config)
  if run_info is not None:
    source = RUN_FILE
    figure = run_info.get("figure") or _guess_figure(run_info.get("task"), parent)
    grid = {k: v for k, v in (run_info.get("grid") or {}).items() if k != "seed"}
    seed = run_info.get("seed")
    task = run_info.get("task") or task
    params = run_info.get("task_params") or params
    preset, wall, device = run_info.get("preset"), run_info.get("wall_s"), run_info.get("device")
    status, target = run_info.get("status"), run_info.get("steps") or target
  elif config is not None:
    source = CONFIG_FILE
    figure = _guess_figure(task, parent)
  else:
    source = "directory name"
    grid, seed = _grid_from_name(workdir.name)
    figure = parent if parent in FIGURES else (parent or "runs")
    task = FIGURES[figure].task if figure in FIGURES else None
  grid = {k: grid[k] for k in GRID_KEYS if grid.get(k) is not None}
  return Run(name=workdir.name, figure=figure, task=task, seed=seed, grid=grid, source=source,
             history=history, chance=_chance(task, params), preset=preset, wall_s=wall,
             device=device, target_steps=target, status=status)


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class Stat:
  """Mean and sample std (ddof = 1; NaN with one value) of values across seeds."""

  mean: float
  std: float
  count: int

  @classmethod
  def of(cls, values: Sequence[float]) -> Optional["Stat"]:
    values = [float(v) for v in values if v is not None]
    if not values:
      return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return cls(float(np.mean(values)), std, len(values))

  def text(self, digits: int = 3) -> str:
    if math.isnan(self.std):
      return f"{self.mean:.{digits}f}"
    return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

  def to_json(self) -> dict:
    return {"mean": self.mean, "std": None if math.isnan(self.std) else self.std,
            "seeds": self.count}


def curve(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean, std) of `key` across runs, on the eval steps every run has (std NaN for one)."""
  common = None
  for run in runs:
    steps = set(run.eval_steps(key))
    common = steps if common is None else common & steps
  steps = np.array(sorted(common or ()), dtype=np.int64)
  values = np.array([[run.history[int(s)][key] for s in steps] for run in runs], dtype=np.float64)
  if values.size == 0:
    return steps, np.zeros(0), np.zeros(0)
  mean = values.mean(axis=0)
  std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.full(len(steps), np.nan)
  return steps, mean, std


def final_stat(runs: Sequence[Run], key: str) -> Optional[Stat]:
  return Stat.of([run.final(key) for run in runs])


# ----------------------------------------------------------------------------- grouping


@dataclasses.dataclass
class Setting:
  """The seeds of one grid point of one figure."""

  grid: dict[str, Any]
  runs: list[Run]

  @property
  def seeds(self) -> list:
    return sorted((r.seed for r in self.runs), key=lambda s: (s is None, s))

  def label(self, series: str, shown: Sequence[str] = ()) -> str:
    """Legend text: the series value, then the other grid values in `shown` (those that vary)."""
    value = self.grid.get(series)
    rest = [f"{k}={self.grid[k]}" for k in shown if k != series and k in self.grid]
    head = f"{'N' if series == 'n' else series}={value}" if value is not None else ""
    return ", ".join([p for p in [head] + rest if p]) or "run"


def group_settings(runs: Sequence[Run], series: str) -> list[Setting]:
  by_setting: dict[tuple, Setting] = {}
  for run in runs:
    key = run.setting()
    by_setting.setdefault(key, Setting(dict(run.grid), []))
    by_setting[key].runs.append(run)

  def order(setting: Setting):
    return tuple((k != series, str(type(v)), v) for k, v in
                 sorted(setting.grid.items(), key=lambda kv: (kv[0] != series, kv[0])))

  return sorted(by_setting.values(), key=order)


def _varying(settings: Sequence[Setting]) -> list[str]:
  keys = [k for k in GRID_KEYS if any(k in s.grid for s in settings)]
  return [k for k in keys if len({repr(s.grid.get(k)) for s in settings}) > 1]


def _overall_group(run: Run, group_prefix: Optional[str] = None) -> str:
  """The eval group of the headline number: 'all' when present, else the only group."""
  groups = run.groups()
  if "all" in groups:
    return "all"
  if group_prefix:
    groups = [g for g in groups if g.startswith(group_prefix + "=")]
  return groups[0] if groups else "all"


# ----------------------------------------------------------------------------- rendering


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _header_label(key: str) -> str:
  return {"n": "N", "t": "t", "eviction": "eviction", "window": "L", "layout": "layout",
          "d_model": "d", "grad_passes": "grad passes", "variant": "variant"}.get(key, key)


def _fmt_cell(value) -> str:
  return "" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def _context_lines(figure: Figure, runs: Sequence[Run]) -> list[str]:
  sources = sorted({r.source for r in runs})
  presets = sorted({r.preset for r in runs if r.preset})
  devices = sorted({r.device for r in runs if r.device})
  seeds = sorted({r.seed for r in runs if r.seed is not None})
  walls = [r.wall_s for r in runs if r.wall_s]
  lines = [f"Paper: {figure.paper}.", ""]
  what = [f"{len(runs)} runs", f"seeds {', '.join(map(str, seeds)) or 'unknown'}"]
  if presets:
    what.append(f"preset {', '.join(presets)}")
  steps = sorted({r.last_step() for r in runs})
  what.append(f"{'steps ' + str(steps[0]) if len(steps) == 1 else f'steps {steps[0]}-{steps[-1]}'}")
  if devices:
    what.append(f"on {', '.join(devices)}")
  if walls:
    what.append(f"wall time per run {np.mean(walls):.0f} s (total {np.sum(walls) / 60:.1f} min)")
  lines.append("Ran: " + "; ".join(what) + ".")
  fixed = {}
  for key in GRID_KEYS:
    values = {repr(r.grid.get(key)) for r in runs}
    if len(values) == 1 and runs[0].grid.get(key) is not None and key != figure.series:
      fixed[key] = runs[0].grid[key]
  if fixed:
    lines.append("Same in every run: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ".")
  source_text = ", ".join(sources)
  lines.append(f"Run settings read from: {source_text}." + (
      " (No run.json or config.json: N, seed and t were inferred from the directory names.)"
      if "directory name" in sources else ""))
  lines.append("Cells: mean ± sample std across seeds at each run's last evaluation "
               "(no ± with one seed).")
  return lines


def _grid_cells(setting: Setting, keys: Sequence[str]) -> list[str]:
  return [_fmt_cell(setting.grid.get(k)) for k in keys]


def _table_keys(settings: Sequence[Setting], series: str) -> list[str]:
  """Grid columns of a table: the series, then whatever else varies between settings."""
  return [series] + [k for k in _varying(settings) if k != series]


def _cells(setting: Setting, keys: Sequence[str], columns: Sequence[tuple[tuple[str, ...], str]]):
  """A table row and its summary entry: grid values, seed count, then one cell per column.

  A column is (where, metric key): `where` is the path of its stat in the summary entry, e.g.
  ("exact",) or ("groups", "k=4", "loss").
  """
  row = _grid_cells(setting, keys) + [str(len(setting.runs))]
  entry: dict[str, Any] = {"grid": setting.grid, "seeds": setting.seeds}
  for where, key in columns:
    stat = final_stat(setting.runs, key)
    row.append(stat.text() if stat else "")
    node = entry
    for part in where[:-1]:
      node = node.setdefault(part, {})
    node[where[-1]] = stat.to_json() if stat else None
  return row, entry


def _plot_mean_band(ax, runs: Sequence[Run], key: str, label: str) -> None:
  """Mean over seeds against step, with a +- std band and error bars when there are 2+ seeds."""
  steps, mean, std = curve(runs, key)
  if not len(steps):
    return
  line, = ax.plot(steps, mean, marker="o", markersize=3, label=label)
  if len(runs) > 1:
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.errorbar(steps, mean, yerr=std, fmt="none", ecolor=line.get_color(), capsize=2)


def _save(fig, ax, figure: Figure, out: Path, *, chance: Optional[float] = None,
          title: Optional[str] = None) -> None:
  if chance is not None:
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
  ax.legend(fontsize=8)
  fig.suptitle(title or figure.title, fontsize=9)
  for axis in fig.axes:
    axis.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / f"{figure.name}.png", dpi=120)
  _plt().close(fig)


_METRIC_NAMES = {"exact": "exact acc.", "accuracy": "per-label acc.", "loss": "eval loss"}


def render_curves(figure: Figure, runs: Sequence[Run], out: Path) -> dict:
  """Figs. 2a / 2b: one curve per series value of the headline metric, and the final table."""
  settings = group_settings(runs, figure.series)
  keys = _table_keys(settings, figure.series)
  chance = runs[0].chance
  group = _overall_group(runs[0])
  metrics = [m for m in _METRIC_NAMES if any(r.final(f"eval/{group}/{m}") is not None
                                             for r in runs)]
  header = [_header_label(k) for k in keys] + ["seeds"] + [
      f"{_METRIC_NAMES[m]} (chance {chance[m]:.3g})" if m in chance else _METRIC_NAMES[m]
      for m in metrics]
  rows, summary = [], []
  for setting in settings:
    row, entry = _cells(setting, keys, [((m,), f"eval/{group}/{m}") for m in metrics])
    rows.append(row)
    summary.append(entry)

  fig, ax = _plt().subplots(figsize=(6.4, 4.2))
  for setting in settings:
    _plot_mean_band(ax, setting.runs, f"eval/{group}/{figure.metric}",
                    setting.label(figure.series, keys))
  ax.set_xlabel("training step")
  ax.set_ylabel(f"test {_METRIC_NAMES.get(figure.metric, figure.metric)}")
  _save(fig, ax, figure, out, chance=chance.get(figure.metric))
  return {"header": header, "rows": rows, "summary": summary}


def render_per_group(figure: Figure, runs: Sequence[Run], out: Path) -> dict:
  """Fig. 3: one panel per eval group (hop count k), eval loss per series value while training."""
  settings = group_settings(runs, figure.series)
  keys = _table_keys(settings, figure.series)
  groups = [g for g in runs[0].groups() if g != "all"]
  columns = [(("groups", g, m), f"eval/{g}/{m}") for m in ("loss", "accuracy") for g in groups]
  header = [_header_label(k) for k in keys] + ["seeds"] + [
      f"{g} {'loss' if m == 'loss' else 'acc.'}" for (_, g, m), _ in columns]
  rows, summary = [], []
  for setting in settings:
    row, entry = _cells(setting, keys, columns)
    rows.append(row)
    summary.append(entry)

  fig, axes = _plt().subplots(1, max(1, len(groups)), figsize=(3.2 * max(1, len(groups)), 3.4),
                              squeeze=False, sharey=True)
  for ax, g in zip(axes[0], groups):
    for setting in settings:
      _plot_mean_band(ax, setting.runs, f"eval/{g}/{figure.metric}",
                      setting.label(figure.series, keys))
    ax.set_title(g, fontsize=9)
    ax.set_xlabel("training step")
  axes[0][0].set_ylabel(f"eval {figure.metric}")
  _save(fig, axes[0][0], figure, out)
  return {"header": header, "rows": rows, "summary": summary}


def render_final_by_group(figure: Figure, runs: Sequence[Run], out: Path) -> dict:
  """Figs. 4 / 5: final accuracy against the eval group (ops), one line per series value."""
  settings = group_settings(runs, figure.series)
  keys = _table_keys(settings, figure.series)
  groups = [g for g in runs[0].groups() if g != "all"]
  columns = [(("groups", g), f"eval/{g}/{figure.metric}") for g in groups + ["all"]]
  header = [_header_label(k) for k in keys] + ["seeds"] + groups + ["all"]
  rows, summary = [], []
  fig, ax = _plt().subplots(figsize=(6.4, 4.2))
  xs = [_group_value(g) for g in groups]
  for setting in settings:
    row, entry = _cells(setting, keys, columns)
    rows.append(row)
    summary.append(entry)
    stats = [entry["groups"][g] for g in groups]
    means = [s["mean"] if s else np.nan for s in stats]
    stds = [(s["std"] or 0.0) if s else 0.0 for s in stats]
    ax.errorbar(xs, means, yerr=stds if len(setting.runs) > 1 else None, marker="o", capsize=3,
                label=setting.label(figure.series, keys))
  ax.set_xticks(xs)
  ax.set_xlabel(groups[0].partition("=")[0] if groups else "group")
  ax.set_ylabel(f"test {figure.metric} at the end of training")
  _save(fig, ax, figure, out, chance=runs[0].chance.get(figure.metric))
  return {"header": header, "rows": rows, "summary": summary}


def _group_value(group: str) -> float:
  try:
    return float(group.partition("=")[2])
  except ValueError:
    return float("nan")


def render_throughput(figure: Figure, files: Sequence[Path], out: Path) -> Optional[dict]:
  """Fig. 6: tokens per second against N, one line per window L, from throughput.json files."""
  records, meta = [], []
  for path in files:
    content = _load_json(path) or {}
    meta.append({k: v for k, v in content.items() if k != "records"})
    records += [r for r in content.get("records", []) if isinstance(r, dict)]
  records = [r for r in records if _finite(r.get("tokens_per_sec")) and "n" in r and "window" in r]
  if not records:
    return None
  windows = sorted({int(r["window"]) for r in records})
  ns = sorted({int(r["n"]) for r in records})
  header = ["L"] + [f"N={n} tokens/s" for n in ns] + [f"N={n} / N={ns[0]}" for n in ns[1:]]
  rows, summary = [], []
  fig, ax = _plt().subplots(figsize=(6.4, 4.2))
  for window in windows:
    stats = {n: Stat.of([r["tokens_per_sec"] for r in records
                         if int(r["window"]) == window and int(r["n"]) == n]) for n in ns}
    base = stats[ns[0]]
    rows.append([str(window)] + [stats[n].text(0) if stats[n] else "" for n in ns]
                + [f"{stats[n].mean / base.mean:.2f}" if stats[n] and base else "" for n in ns[1:]])
    summary.append({"window": window, "tokens_per_sec": {
        str(n): stats[n].to_json() if stats[n] else None for n in ns}})
    present = [n for n in ns if stats[n]]
    means = [stats[n].mean for n in present]
    stds = [0.0 if math.isnan(stats[n].std) else stats[n].std for n in present]
    line = ax.errorbar(present, means, yerr=stds, marker="o", capsize=3, label=f"L={window}")
    if present:  # the 1/N line through the smallest N: where throughput would be if only N cost
      ax.plot(present, [means[0] * present[0] / n for n in present], linestyle=":",
              color=line[0].get_color(), linewidth=1)
  ax.set_xlabel("N (sleep passes per consolidation window)")
  ax.set_ylabel("training tokens / s")
  ax.set_yscale("log")
  ax.set_xticks(ns)
  _save(fig, ax, figure, out, title=f"{figure.title} (dotted: 1/N from N = {ns[0]})")
  return {"header": header, "rows": rows, "summary": summary, "meta": meta}


def _write_markdown(figure: Figure, result: dict, context: list[str], out: Path) -> None:
  lines = [f"# {figure.title}", ""] + context + [""]
  lines += _table(result["header"], result["rows"])
  lines += ["", f"![{figure.name}]({figure.name}.png)", ""]
  (out / f"{figure.name}.md").write_text("\n".join(lines))


def _generic_figure(name: str, runs: Sequence[Run]) -> Figure:
  """A figure for runs outside the paper's set: curves of the headline metric per setting."""
  settings = group_settings(runs, "n")
  varying = _varying(settings)
  series = varying[0] if varying else "n"
  metric = "exact" if any(r.final(f"eval/{_overall_group(r)}/exact") is not None for r in runs) \
      else "loss"
  return Figure(name, f"{name}: eval {metric} while training", runs[0].task, "curves", series,
                metric, "not a figure of the paper")


def report(run_paths: Sequence[str | Path], out: str | Path) -> dict:
  """Writes `<figure>.md`, `<figure>.png` and `summary.json` into `out`; returns the summary."""
  out = Path(out)
  workdirs = find_workdirs(run_paths)
  throughput_files = find_throughput_files(run_paths)
  if not workdirs and not throughput_files:
    raise ValueError(f"--runs: no {METRICS_FILE} or {THROUGHPUT_FILE} found under "
                     f"{', '.join(map(str, run_paths))}")
  out.mkdir(parents=True, exist_ok=True)
  by_figure: dict[str, list[Run]] = {}
  left_out: dict[str, list[str]] = {}  # unfinished runs: a table compares finished runs only
  for workdir in workdirs:
    run = describe(workdir)
    if not run.history:
      continue
    if run.unfinished:
      left_out.setdefault(run.figure, []).append(f"{run.name} ({run.unfinished})")
    else:
      by_figure.setdefault(run.figure, []).append(run)
  for name in sorted(set(left_out) - set(by_figure)):
    print(f"{name}: every run is unfinished, no table: {'; '.join(left_out[name])}",
          file=sys.stderr)
  summary: dict[str, Any] = {}
  for name in sorted(by_figure):
    runs = sorted(by_figure[name], key=lambda r: (r.setting(), r.seed is None, r.seed))
    figure = FIGURES.get(name) or _generic_figure(name, runs)
    render = {"curves": render_curves, "per_group": render_per_group,
              "final_by_group": render_final_by_group}.get(figure.kind, render_curves)
    result = render(figure, runs, out)
    context = _context_lines(figure, runs)
    if name in left_out:
      context.append(f"Left out, unfinished: {'; '.join(sorted(left_out[name]))}.")
    _write_markdown(figure, result, context, out)
    summary[name] = {"title": figure.title, "runs": [r.name for r in runs],
                     "sources": sorted({r.source for r in runs}), "header": result["header"],
                     "rows": result["rows"], "settings": result["summary"],
                     "left_out": sorted(left_out.get(name, []))}
  if throughput_files:
    figure = FIGURES["fig6"]
    result = render_throughput(figure, throughput_files, out)
    if result is not None:
      meta = result["meta"]
      context = [f"Paper: {figure.paper}.", ""]
      for m in meta:
        described = ", ".join(f"{k} {v}" for k, v in m.items() if not isinstance(v, (dict, list)))
        context.append(f"Measured: {described}.")
      context.append("Cells: mean ± sample std of tokens/s over repeated timings; ratios of means.")
      _write_markdown(figure, result, context, out)
      summary["fig6"] = {"title": figure.title, "header": result["header"], "rows": result["rows"],
                         "settings": result["summary"], "meta": meta}
  (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.report",
      description="Markdown tables and PNG plots of the paper's figures from training workdirs.")
  parser.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                      help="workdirs or folders above them (comma-separated lists work too)")
  parser.add_argument("--out", default="docs/results", help="output folder (default docs/results)")
  args = parser.parse_args(argv)
  paths = [p for arg in args.runs for p in arg.split(",") if p]
  try:
    summary = report(paths, args.out)
  except ValueError as error:
    parser.error(str(error))
  for name, entry in summary.items():
    print(f"\n{entry['title']}")
    print("\n".join(_table(entry["header"], entry["rows"])))
    print(f"-> {Path(args.out) / (name + '.md')}, {Path(args.out) / (name + '.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
