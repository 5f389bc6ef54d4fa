"""The trainer: exact resume, SIGTERM, corrupt checkpoints, non-finite stops, bad flags.

Every run here uses the cellular-automaton `smoke` preset, so they share one compiled train step
(the learning rates are step arguments, and JAX's persistent compilation cache is shared by the
in-process runs and the subprocesses).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax

CACHE_DIR = os.path.join(tempfile.gettempdir(), "sleep_jax_test_compilation_cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

from experiments import configs  # noqa: E402
from experiments import train as trainer  # noqa: E402
from sleep_jax import data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CA_CONFIG = os.path.join(REPO, "experiments", "configs", "cellular_automaton.py")
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=REPO)


def smoke(**overrides):
  config = configs.get("cellular_automaton", "smoke")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def without_timing(records):
  return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def saved_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def saved_state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path)


def assert_same_arrays(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Four steps in one go (checkpoints at 2 and 4, eval at 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = trainer.train(smoke(), workdir)
  return workdir, result


def test_uninterrupted_run_logs_and_checkpoints(uninterrupted):
  workdir, result = uninterrupted
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert np.isfinite(r["loss"]) and r["loss"] > 0 and 0 <= r["accuracy"] <= 1
    assert r["perf/steps_per_sec"] > 0 and r["perf/tokens_per_sec"] > 0
  # Eval per difficulty group (t for this task) at the eval interval and at the end.
  assert "eval/t=4/accuracy" in records[1] and "eval/t=4/accuracy" in records[3]
  assert "eval/t=4/accuracy" not in records[0]
  assert records[3]["eval/t=4/count"] == 16
  assert result["step"] == 4 and not result["preempted"]
  assert result["eval/t=4/accuracy"] == records[3]["eval/t=4/accuracy"]
  assert saved_steps(workdir) == [2, 4]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  state = saved_state(workdir, 4)
  assert int(state["step"]) == 4


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / "resumed")
  first = trainer.train(smoke(), workdir, stop_at_step=2)
  assert first["preempted"] and first["step"] == 2 and saved_steps(workdir) == [2]
  second = trainer.train(smoke(), workdir)
  assert second["step"] == 4 and not second["preempted"]
  assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(reference))
  assert_same_arrays(saved_state(workdir, 4), saved_state(reference, 4))
  # Rerunning a finished run trains nothing and reports the same final metrics.
  again = trainer.train(smoke(), workdir)
  assert again["step"] == 4 and again["loss"] == second["loss"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path, caplog):
  reference, _ = uninterrupted
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(reference, workdir)
  # Corrupt step 4 (its array data is gone) and leave a half-written save of step 6 behind.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0"))
  os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp", "state"))
  caplog.set_level("WARNING")
  result = trainer.train(smoke(), workdir)
  assert "step 4" in caplog.text and "falling back" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))
  assert result["step"] == 4
  # It resumed from step 2 and redid steps 3 and 4 exactly.
  assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(reference))
  assert_same_arrays(saved_state(workdir, 4), saved_state(reference, 4))
  assert saved_steps(workdir) == [2, 4]


def test_a_workdir_of_another_run_is_not_resumed(uninterrupted):
  reference, _ = uninterrupted
  with pytest.raises(trainer.ConfigError, match=r"--config\.n\b.*new --workdir"):
    trainer.train(smoke(n=3), reference)
  with pytest.raises(trainer.ConfigError, match=r"--config\.model\.d_model"):
    trainer.train(smoke(**{"model.d_model": 64}), reference)
  assert saved_steps(reference) == [2, 4]


def test_a_run_resumes_with_another_way_of_computing_the_same_model(uninterrupted, tmp_path):
  """chunk_size, delta_impl, attention_impl, remat, scan_layers and delta_unroll change how the
  model is computed, not the checkpoint: the finished run is found and reported, nothing is
  retrained."""
  reference, result = uninterrupted
  workdir = str(tmp_path / "other_kernels")
  shutil.copytree(reference, workdir)
  again = trainer.train(smoke(**{"model.chunk_size": 4, "model.delta_impl": "scan",
                                 "model.remat": "none", "model.delta_unroll": 2}), workdir)
  assert again["step"] == 4 and again["loss"] == result["loss"]
  assert saved_steps(workdir) == [2, 4]


def test_non_finite_loss_stops_with_the_last_good_state(tmp_path, monkeypatch):
  original = data.TrainBatches.__getitem__

  def poisoned(self, step):
    batch = original(self, step)
    if int(step) == 2:  # the third batch: a token id outside the vocabulary embeds as NaN
      batch["tokens"] = batch["tokens"].copy()
      batch["tokens"][0, 0] = 10_000
    return batch

  monkeypatch.setattr(data.TrainBatches, "__getitem__", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteError, match=r"at step 3 .*last good state \(step 2\)"):
    trainer.train(smoke(checkpoint_every=1000, log_every=4, eval_every=0), workdir)
  assert saved_steps(workdir) == [2]
  assert int(saved_state(workdir, 2)["step"]) == 2
  last = read_metrics(workdir)[-1]
  assert last["step"] == 3 and last["non_finite"] is True

  # The saved state is exactly the state after two good steps, data position included: a rerun
  # with clean data resumes from it and continues as if nothing had happened.
  monkeypatch.setattr(data.TrainBatches, "__getitem__", original)
  result = trainer.train(smoke(), workdir)
  assert result["step"] == 4 and np.isfinite(result["loss"])


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
  workdir = str(tmp_path / "sigterm")
  cmd = [sys.executable, "-m", "experiments.train", f"--config={CA_CONFIG}:smoke",
         f"--workdir={workdir}", "--config.steps=100000", "--config.checkpoint_every=100000",
         "--config.eval_every=0", "--config.log_every=1"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and len(read_metrics(workdir)) >= 2:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == trainer.EXIT_PREEMPTED, output[-3000:]
  steps = saved_steps(workdir)
  assert len(steps) == 1 and 2 <= steps[0] < 100000
  stopped = steps[0]
  assert read_metrics(workdir)[-1]["step"] == stopped

  result = trainer.train(smoke(steps=stopped + 1), workdir)
  assert result["step"] == stopped + 1 and not result["preempted"]
  assert [r["step"] for r in read_metrics(workdir)] == list(range(1, stopped + 2))


# ----------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("overrides, flag", [
    ({"task.name": "chess"}, "--config.task.name"),
    ({"n": 0}, "--config.n"),
    ({"grad_passes": 3}, "--config.grad_passes"),
    ({"model.d_model": -4}, "--config.model.d_model"),
    ({"model.eviction": "none"}, "--config.n"),  # n = 2 with no boundary to sleep at
    ({"eval_examples": 10**9}, "--config.eval_examples"),
    ({"optim.muon_lr": 0.0}, "--config.optim.muon_lr"),
])
def test_bad_flags_name_the_flag(overrides, flag):
  with pytest.raises(trainer.ConfigError, match=flag.replace(".", r"\.")):
    trainer.validate(smoke(**overrides))


def test_window_longer_than_the_sequence_names_the_window_flag():
  config = configs.get("math", "smoke")
  config.task.params.window = 512  # the tiny scale's problems are at most 128 tokens long
  with pytest.raises(trainer.ConfigError, match=r"--config\.task\.params\.window"):
    trainer.validate(config)


def test_batch_not_divisible_by_devices_fails_fast(tmp_path):
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.train", f"--config={CA_CONFIG}:smoke",
         f"--workdir={tmp_path / 'w'}", "--config.batch_size=3"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "config.batch_size=3" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["--config.mesh.data=2"],
                                  ["--config.mesh.data=1", "--config.mesh.fsdp=2"]])
def test_two_device_meshes_match_one_device(uninterrupted, tmp_path, mesh):
  reference, _ = uninterrupted
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.train", f"--config={CA_CONFIG}:smoke",
         f"--workdir={tmp_path}", *mesh]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for got, want in zip(read_metrics(tmp_path), read_metrics(reference), strict=True):
    for key in ("loss", "grad_norm", "eval/all/loss"):
      if key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
