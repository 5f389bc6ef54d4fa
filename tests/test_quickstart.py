"""Tests of experiments.quickstart, and of the report on workdirs the trainer really wrote.

The module fixture runs the quickstart once in its tiny mode (the smoke preset, two steps, N = 1
and N = 2, one seed): two real `experiments.train` runs. The tests then check the printed table
against the metrics the trainer logged, and report on the same workdirs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil

import pytest

from experiments import quickstart
from experiments import report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("quickstart")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    status = quickstart.main(["--tiny", "--steps=2", "--ns=1,2", "--seeds=0", f"--workdir={root}"])
  return status, printed.getvalue(), root


def final_eval(workdir, key):
  """The last value of `key` in a trainer's metrics.jsonl, read directly."""
  values = [json.loads(line).get(key) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [v for v in values if v is not None][-1]


def test_tiny_quickstart_prints_the_table_of_what_the_trainer_logged(tiny_run):
  status, printed, root = tiny_run
  assert status == 0
  assert "exact acc (chance 0.0625)" in printed and "per-label acc (chance 0.5)" in printed
  rows = {int(m.group(1)): (float(m.group(2)), float(m.group(3)))
          for m in re.finditer(r"^(\d+)\s+([0-9.]+)\s+([0-9.]+)\s*$", printed, re.M)}
  assert sorted(rows) == [1, 2]
  for n, (exact, accuracy) in rows.items():
    workdir = root / f"n{n}_seed0"
    assert exact == pytest.approx(final_eval(workdir, "eval/all/exact"), abs=5e-4)
    assert accuracy == pytest.approx(final_eval(workdir, "eval/all/accuracy"), abs=5e-4)
    assert json.loads((workdir / "config.json").read_text())["n"] == n
  plot = re.search(r"^plot: (.+)$", printed, re.M).group(1)
  assert plot == str(root / "quickstart.png")
  assert (root / "quickstart.png").read_bytes()[:4] == b"\x89PNG"


def test_report_on_the_trainer_workdirs(tiny_run, tmp_path):
  """The two runs, moved under fig2b/ without run.json: the report reads the trainer's config.json."""
  _, _, root = tiny_run
  for n in (1, 2):
    target = tmp_path / "runs" / "fig2b" / f"run{n}"
    shutil.copytree(root / f"n{n}_seed0", target, ignore=shutil.ignore_patterns("checkpoints"))
    (target / "run.json").unlink()
  summary = report.report([tmp_path / "runs"], tmp_path / "out")
  entry = summary["fig2b"]
  assert entry["sources"] == ["config.json"]
  assert [row[0] for row in entry["rows"]] == ["1", "2"]  # N, read from config.json
  for setting in entry["settings"]:
    n = setting["grid"]["n"]
    assert setting["accuracy"]["mean"] == pytest.approx(
        final_eval(root / f"n{n}_seed0", "eval/all/accuracy"))
    assert setting["accuracy"]["std"] is None  # one seed
  assert (tmp_path / "out" / "fig2b.png").read_bytes()[:4] == b"\x89PNG"
  markdown = (tmp_path / "out" / "fig2b.md").read_text()
  assert "| 1 | 1 |" in markdown  # N, seeds
  fixed = re.search(r"^Same in every run: (.*)\.$", markdown, re.M).group(1).split(", ")
  assert {"t=4", "eviction=hard", "window=24"} <= set(fixed)  # the smoke preset's task


def test_default_setting_is_a_valid_trainer_config():
  from experiments import train

  config = quickstart.build_config(3, 1, tiny=False, steps=None)
  run = train.validate(config)
  assert (config.n, config.seed, run.steps) == (3, 1, quickstart.QUICKSTART["steps"])
  # The calibrated task and model (docs/results.md), whatever the preset is edited into.
  assert {k: run.task.params()[k] for k in ("t", "width", "states", "window")} == {
      "t": 4, "width": 12, "states": 2, "window": 12}
  assert (run.model.layout, run.model.d_model, config.batch_size) == ("AGAG", 64, 64)
  assert (config.optim.muon_lr, config.optim.adam_lr, config.optim.warmup_steps) == (1e-2, 1e-3, 50)


def test_verdict_is_per_seed_and_plain():
  def summary(base, other):
    return {1: {"per_seed": dict(enumerate(base)), "exact": report.Stat.of(base)},
            3: {"per_seed": dict(enumerate(other)), "exact": report.Stat.of(other)}}

  won = quickstart.verdict(summary([0.30, 0.26], [0.50, 0.40]), chance_exact=0.25)
  assert "beat N=1 in all 2 seeds" in won[0] and "+0.170" in won[0]
  assert "cannot tell" in won[0] and "visible" not in won[0]      # 2 < MIN_SEEDS seeds
  assert any("near chance" in line for line in won)
  won3 = quickstart.verdict(summary([0.30, 0.26, 0.3], [0.50, 0.40, 0.4]), chance_exact=0.25)
  assert "beat N=1 in all 3 seeds" in won3[0] and "visible" in won3[0]
  mixed = quickstart.verdict(summary([0.60, 0.50], [0.70, 0.40]), chance_exact=0.25)
  assert "beat N=1 in 1 of 2 seeds only" in mixed[0] and "+0.000" in mixed[0]
  assert len(mixed) == 1
  lost = quickstart.verdict(summary([0.90, 0.89], [0.80, 0.61]), chance_exact=0.25)
  assert "did not beat N=1 in any of 2 seeds" in lost[0] and "-0.190" in lost[0]
  assert "cannot tell" in lost[0] and "no sleep effect" not in lost[0]
  lost3 = quickstart.verdict(summary([0.9, 0.89, 0.9], [0.8, 0.61, 0.7]), chance_exact=0.25)
  assert "did not beat N=1 in any of 3 seeds" in lost3[0] and "no sleep effect" in lost3[0]
  single = quickstart.verdict(summary([0.3], [0.5]), chance_exact=0.25)
  assert "single seed" in single[0] and "cannot tell" in single[0]


@pytest.mark.parametrize("flags", [["--ns=0"], ["--seeds=x"], ["--steps=0"],
                                   ["--set=model.d_model=-4"], ["--set=no_such=1"]])
def test_bad_flags_exit_before_training(flags, capsys):
  with pytest.raises(SystemExit) as error:
    quickstart.main(flags)
  assert error.value.code == 2
  assert "error" in capsys.readouterr().err


def test_a_stopped_run_prints_no_table_and_a_rerun_resumes_it(tmp_path, monkeypatch, capsys,
                                                               caplog):
  """SIGTERM during a run (simulated with the trainer's stop_at_step): exit 143, no table, a
  run.json that says so; the same command again finishes from the checkpoint."""
  import functools

  from experiments import train

  flags = ["--tiny", "--steps=2", "--ns=1", "--seeds=0", f"--workdir={tmp_path}"]
  real_train = train.train
  monkeypatch.setattr(train, "train", functools.partial(real_train, stop_at_step=1))
  assert quickstart.main(flags) == quickstart.EXIT_PREEMPTED
  out, err = capsys.readouterr()
  assert "exact acc" not in out and "plot:" not in out
  assert "stopped (SIGTERM) before step 2" in err and f"--workdir={tmp_path}" in err
  info = json.loads((tmp_path / "n1_seed0" / "run.json").read_text())
  assert (info["status"], info["stopped_at_step"]) == ("preempted", 1)

  monkeypatch.setattr(train, "train", real_train)
  caplog.set_level(logging.INFO, logger="experiments.train")
  assert quickstart.main(flags) == 0
  info = json.loads((tmp_path / "n1_seed0" / "run.json").read_text())
  assert (info["status"], info["stopped_at_step"]) == ("done", 2)
  # Resumed, not restarted (the metrics alone cannot tell: a restart is deterministic too, and
  # the trainer rewrites metrics.jsonl from its start step).
  assert "resumed from the checkpoint at step 1" in caplog.text
  steps = [json.loads(line)["step"] for line in
           (tmp_path / "n1_seed0" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]
