"""Tests of experiments.report and the sweep runner.

The workdirs here are built by hand: `metrics.jsonl` files written as test fixtures, with values
from simple formulas, so the expected means and standard deviations can be computed independently
(with the `statistics` module). The report on workdirs the trainer really wrote (the smoke preset,
two steps) is in tests/test_quickstart.py, which trains them once for both.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from experiments import report
from experiments.sweeps import common
from experiments.sweeps import fig2b
from experiments.sweeps import fig4


def write_run(workdir: Path, records: list[dict], run_info: dict | None = None,
              config: dict | None = None) -> Path:
  """A fixture workdir: metrics.jsonl (+ run.json / config.json when given)."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if run_info is not None:
    (workdir / "run.json").write_text(json.dumps(run_info))
  if config is not None:
    (workdir / "config.json").write_text(json.dumps(config))
  return workdir


def ca_value(n: int, seed: int, step: int) -> float:
  """Fixture exact accuracy: grows with n and step, differs per seed."""
  return round(0.05 + 0.1 * n * step / 100 + 0.01 * seed, 6)


def ca_records(n: int, seed: int, steps=(50, 100)) -> list[dict]:
  out = []
  for step in steps:
    out.append({"step": step, "loss": 1.0 / step})  # a training-log line
    exact = ca_value(n, seed, step)
    out.append({"step": step, "eval/t=32/exact": exact, "eval/all/exact": exact,
                "eval/t=32/accuracy": 0.5 + exact / 2, "eval/all/accuracy": 0.5 + exact / 2,
                "eval/all/loss": 1.0 - exact})
  return out


@pytest.fixture()
def fig2b_runs(tmp_path):
  root = tmp_path / "runs"
  for n in (1, 2):
    for seed in (0, 1, 2):
      info = {"figure": "fig2b", "task": "cellular_automaton", "seed": seed,
              "grid": {"n": n, "t": 32}, "task_params": {"t": 32, "states": 4},
              "preset": "small", "wall_s": 10.0 * n, "device": "CPU"}
      write_run(root / "fig2b" / f"n{n}_t32_seed{seed}", ca_records(n, seed), info)
  return root


def test_read_metrics_merges_lines_of_a_step_and_skips_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "eval/all/exact": 0.5}\n'
                  '{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  history = report.read_metrics(path)
  assert history == {1: {"step": 1, "loss": 2.0, "eval/all/exact": 0.5},
                     2: {"step": 2, "loss": 1.5}}
  path.write_text('{"loss": 2.0}\n')
  with pytest.raises(ValueError, match="step"):
    report.read_metrics(path)


def test_fig2b_table_and_summary_match_independent_statistics(fig2b_runs, tmp_path):
  out = tmp_path / "out"
  summary = report.report([fig2b_runs], out)
  assert (out / "fig2b.png").stat().st_size > 1000
  assert (out / "fig2b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  markdown = (out / "fig2b.md").read_text()
  settings = summary["fig2b"]["settings"]
  assert [s["grid"]["n"] for s in settings] == [1, 2]
  for setting in settings:
    n = setting["grid"]["n"]
    finals = [ca_value(n, seed, 100) for seed in (0, 1, 2)]
    assert setting["exact"]["mean"] == pytest.approx(statistics.mean(finals))
    assert setting["exact"]["std"] == pytest.approx(statistics.stdev(finals))
    assert setting["exact"]["seeds"] == 3
    cell = f"{statistics.mean(finals):.3f} ± {statistics.stdev(finals):.3f}"
    assert cell in markdown
  assert "chance 0.0625" in markdown  # 4 states: 1/16
  assert "run.json" in markdown and "seeds 0, 1, 2" in markdown
  assert json.loads((out / "summary.json").read_text())["fig2b"]["rows"] == summary["fig2b"]["rows"]


def test_unfinished_runs_are_left_out_of_the_table_and_named(fig2b_runs, tmp_path):
  """A run still training (config.json says 800 steps, metrics stop at 100) and one stopped by
  SIGTERM (run.json status "preempted") must not enter the means: they were trained less."""
  in_progress = write_run(fig2b_runs / "fig2b" / "n1_t32_seed3", ca_records(1, 3),
                          config={"n": 1, "seed": 3, "steps": 800,
                                  "task": {"name": "cellular_automaton", "params": {"t": 32}}})
  write_run(fig2b_runs / "fig2b" / "n2_t32_seed3", ca_records(2, 3),
            {"figure": "fig2b", "task": "cellular_automaton", "seed": 3, "grid": {"n": 2, "t": 32},
             "steps": 400, "status": "preempted"})
  assert report.describe(in_progress).unfinished == "step 100 of 800"
  summary = report.report([fig2b_runs], tmp_path / "out")
  for setting in summary["fig2b"]["settings"]:
    finals = [ca_value(setting["grid"]["n"], seed, 100) for seed in (0, 1, 2)]
    assert setting["exact"]["seeds"] == 3
    assert setting["exact"]["mean"] == pytest.approx(statistics.mean(finals))
  assert summary["fig2b"]["left_out"] == ["n1_t32_seed3 (step 100 of 800)",
                                          "n2_t32_seed3 (preempted at step 100 of 400)"]
  markdown = (tmp_path / "out" / "fig2b.md").read_text()
  assert "Left out, unfinished: n1_t32_seed3 (step 100 of 800); n2_t32_seed3" in markdown
  # A finished run's config.json with the same steps as its last metrics line counts.
  done = write_run(tmp_path / "other" / "fig2b" / "n1_t32_seed0", ca_records(1, 0),
                   config={"n": 1, "seed": 0, "steps": 100,
                           "task": {"name": "cellular_automaton", "params": {"t": 32}}})
  assert report.describe(done).unfinished is None


def test_curve_uses_steps_every_seed_has(tmp_path):
  a = write_run(tmp_path / "fig2b" / "n1_seed0", ca_records(1, 0, steps=(50, 100, 150)))
  b = write_run(tmp_path / "fig2b" / "n1_seed1", ca_records(1, 1, steps=(50, 100)))
  runs = [report.describe(a), report.describe(b)]
  steps, mean, std = report.curve(runs, "eval/all/exact")
  assert steps.tolist() == [50, 100]
  for i, step in enumerate(steps):
    values = [ca_value(1, 0, int(step)), ca_value(1, 1, int(step))]
    assert mean[i] == pytest.approx(statistics.mean(values))
    assert std[i] == pytest.approx(statistics.stdev(values))
  # One seed: no spread to show.
  assert report.Stat.of([0.5]).text() == "0.500"


def test_run_description_sources_in_order(tmp_path):
  records = ca_records(1, 0)
  config = {"task": {"name": "cellular_automaton", "params": {"t": 16, "states": 2}},
            "model": {"eviction": "hard"}, "n": 3, "seed": 5}
  from_config = report.describe(write_run(tmp_path / "fig2a" / "anything", records,
                                          config=config))
  assert (from_config.source, from_config.figure, from_config.seed) == ("config.json", "fig2a", 5)
  assert from_config.grid == {"n": 3, "t": 16, "eviction": "hard"}
  matched = report.describe(write_run(
      tmp_path / "fig2b" / "cm", records,
      config={**config, "n": 1, "compute_match_n": 4, "model": {"layout": "AGAG"}}))
  assert matched.grid == {"n": 1, "t": 16, "layout": "AGAG",
                          "variant": "compute-matched to N=4"}
  assert from_config.chance["exact"] == 0.25

  info = {"figure": "fig2b", "seed": 1, "grid": {"n": 2, "t": 32}, "task": "cellular_automaton"}
  from_run = report.describe(write_run(tmp_path / "x" / "y", records, run_info=info,
                                       config=config))
  assert (from_run.source, from_run.figure, from_run.seed) == ("run.json", "fig2b", 1)
  assert from_run.grid == {"n": 2, "t": 32}

  from_name = report.describe(write_run(tmp_path / "fig5" / "n4_sliding_seed2", records))
  assert from_name.source == "directory name"
  assert (from_name.figure, from_name.seed) == ("fig5", 2)
  assert from_name.grid == {"n": 4, "eviction": "sliding"}


def test_inferred_runs_are_labelled_as_such(tmp_path):
  for seed in (0, 1):
    write_run(tmp_path / "runs" / "fig2b" / f"n2_t32_seed{seed}", ca_records(2, seed))
  report.report([tmp_path / "runs"], tmp_path / "out")
  assert "inferred from the directory names" in (tmp_path / "out" / "fig2b.md").read_text()


def test_multi_hop_and_math_figures(tmp_path):
  root = tmp_path / "runs"
  for n in (1, 4):
    for seed in (0, 1):
      records = [{"step": 10}]
      for k in (1, 2, 4):
        records[0][f"eval/k={k}/loss"] = k / n + seed
        records[0][f"eval/k={k}/accuracy"] = 1 / k
      write_run(root / "fig3" / f"n{n}_seed{seed}", records,
                {"figure": "fig3", "task": "multi_hop", "seed": seed, "grid": {"n": n}})
      ops = {f"eval/ops={o}/accuracy": 1 - o / 10 + 0.01 * n + 0.001 * seed for o in (2, 4)}
      ops["eval/all/accuracy"] = 0.5
      write_run(root / "fig4" / f"n{n}_hard_seed{seed}", [{"step": 20, **ops}],
                {"figure": "fig4", "task": "math", "seed": seed,
                 "grid": {"n": n, "eviction": "hard"}, "task_params": {"modulus": 23}})
  out = tmp_path / "out"
  summary = report.report([root], out)
  assert {"fig3", "fig4"} <= set(summary)
  for name in ("fig3", "fig4"):
    assert (out / f"{name}.png").stat().st_size > 1000
  k4 = {s["grid"]["n"]: s["groups"]["k=4"]["loss"] for s in summary["fig3"]["settings"]}
  assert k4[4]["mean"] == pytest.approx(statistics.mean([4 / 4 + 0, 4 / 4 + 1]))
  assert k4[1]["std"] == pytest.approx(statistics.stdev([4.0, 5.0]))
  header = summary["fig4"]["header"]
  assert header[:4] == ["N", "seeds", "ops=2", "ops=4"]
  ops2 = {s["grid"]["n"]: s["groups"]["ops=2"]["mean"] for s in summary["fig4"]["settings"]}
  assert ops2[4] == pytest.approx(statistics.mean([0.8 + 0.04, 0.8 + 0.041]))


def test_throughput_table(tmp_path):
  records = [{"n": n, "window": w, "tokens_per_sec": 1000.0 * w / n + r, "repeat": r}
             for w in (32, 128) for n in (1, 2, 4) for r in (0, 1)]
  path = tmp_path / "runs" / "fig6" / "throughput.json"
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({"device": "CPU", "records": records}))
  summary = report.report([tmp_path / "runs"], tmp_path / "out")
  rows = {row[0]: row for row in summary["fig6"]["rows"]}
  # Ratio of means, N=4 over N=1 at L=128: (32000.5) / (128000.5).
  assert rows["128"][-1] == f"{(128000 / 4 + 0.5) / (128000 + 0.5):.2f}"
  assert (tmp_path / "out" / "fig6.png").exists()


def test_cli_errors_and_output(fig2b_runs, tmp_path, capsys):
  assert report.main(["--runs", str(fig2b_runs), "--out", str(tmp_path / "o")]) == 0
  printed = capsys.readouterr().out
  assert "Fig. 2b" in printed and "| 2 | 3 |" in printed
  with pytest.raises(SystemExit):
    report.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit):
    report.main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def test_sweep_dry_run_and_grid(capsys, tmp_path):
  assert fig2b.main(["--dry-run", "--seeds=0,1", "--ns=1,4", f"--root={tmp_path}",
                     "--set=model.d_model=64"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  assert all("-m experiments.train" in l and "--config.task.params.t=32" in l for l in lines)
  assert "--config.n=4" in lines[2] and "--config.seed=0" in lines[2]
  assert "--config.model.d_model=64" in lines[0]
  assert lines[3].endswith("fig2b/n4_t32_seed1")
  with pytest.raises(SystemExit):
    fig2b.main(["--dry-run", "--seeds=a"])
  for bad in ("--set=model.no_such_field=1", "--set=model.d_model=abc", "--set=d_model"):
    with pytest.raises(SystemExit):  # refused before anything runs
      fig2b.main(["--dry-run", bad])


def test_sweep_writes_run_json_that_the_report_reads(tmp_path):
  """run_grid with a stand-in trainer that writes metrics.jsonl where the command says."""

  def fake_trainer(command):
    workdir = Path(command[-1].partition("=")[2])
    n = int(next(a for a in command if a.startswith("--config.n=")).split("=")[1])
    seed = int(next(a for a in command if a.startswith("--config.seed=")).split("=")[1])
    write_run(workdir, [{"step": 5, "eval/ops=2/accuracy": 0.1 * n + 0.01 * seed,
                         "eval/all/accuracy": 0.1 * n}])
    return 0

  parser = common.base_parser("fig4", "test")
  fig4_flags = ["--seeds=0,1", f"--root={tmp_path / 'runs'}", "--ns=1,2"]
  from experiments.sweeps import math_grid
  math_grid.add_flags(parser, "preset")
  args = parser.parse_args(fig4_flags)
  specs = math_grid.make_specs("fig4", "hard", args, (0, 1))
  assert common.run_grid(specs, args, runner=fake_trainer) == 0
  info = json.loads((tmp_path / "runs" / "fig4" / "n2_hard_seed1" / "run.json").read_text())
  assert info["status"] == "done" and info["grid"] == {"n": 2, "eviction": "hard"}
  assert info["task_params"]["scale"] == "small"
  # Finished runs are skipped the second time.
  assert common.run_grid(specs, args, runner=lambda c: pytest.fail("reran a finished run")) == 0
  summary = report.report([tmp_path / "runs"], tmp_path / "out")
  ops2 = {s["grid"]["n"]: s["groups"]["ops=2"] for s in summary["fig4"]["settings"]}
  assert ops2[2]["mean"] == pytest.approx(statistics.mean([0.2, 0.21]))
  assert summary["fig4"]["sources"] == ["run.json"]


def test_fig6_grid_keeps_tokens_per_step(capsys):
  from experiments.sweeps import fig6

  assert fig6.main(["--preset=smoke", "--dry-run", "--ns=1,3", "--windows=16,64",
                    "--tokens_per_step=1024"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  for line in lines:
    fields = dict(part.split("=") for part in line.split() if "=" in part)
    assert int(fields["batch"]) * int(fields["T"]) == 1024  # same tokens per step at every L
    assert int(fields["T"]) == 4 * int(fields["L"])
  assert fig6.batch_size(100, 64, 4) == 1  # never an empty batch
  with pytest.raises(SystemExit):
    fig6.main(["--dry-run", "--windows_per_example=1"])
