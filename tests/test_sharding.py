"""Sharding: one device here, 8 fake CPU devices in a subprocess (tests/_sharding_worker.py).

The 8-device checks compare a sharded train step (loss and gradients), sleep and wake against the
same computation on one device, for a data-parallel (8, 1, 1), an FSDP (2, 4, 1) and a
tensor-parallel (2, 2, 2) mesh, and restore a checkpoint written under one mesh into another.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sleep_jax
from sleep_jax import sharding

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
CONFIG = sleep_jax.ModelConfig(vocab_size=11, d_model=32, num_heads=4, layout="AG", window=8,
                               mlp_dim=64)


# ----------------------------------------------------------------------------- 8 fake devices


@pytest.fixture(scope="module")
def eight_devices():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env,
                        timeout=900, cwd=WORKER.parent.parent)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout)
  assert result["devices"] == 8
  return result


MESHES = {"data": {"data": 8, "fsdp": 1, "tensor": 1},
          "fsdp": {"data": 2, "fsdp": 4, "tensor": 1},
          "tensor": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_train_step_equals_one_device(eight_devices, name):
  res = eight_devices["meshes"][name]
  assert res["mesh_shape"] == MESHES[name]
  assert res["batch_sharded_as_requested"]
  assert res["grad_norm"] > 0.1  # the gradients compared are not trivially zero
  assert res["loss_err"] < 1e-5 and res["metrics_err"] < 1e-5
  assert res["grad_err"] < 1e-4, res


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_sleep_and_wake_equal_one_device_and_keep_shardings(eight_devices, name):
  res = eight_devices["meshes"][name]
  for key in ("sleep_err", "wake_logits_err", "wake_state_err", "wake_cache_err"):
    assert res[key] < 1e-5, (key, res[key])
  assert res["sleep_state_keeps_sharding"], res["sleep_state_spec"]
  assert res["wake_state_keeps_sharding"]
  assert res["wake_kv_keeps_sharding"]


def test_scanned_blocks_sharded_equal_unrolled_blocks_on_one_device(eight_devices):
  res = eight_devices["scan_layers"]
  assert res["grad_norm"] > 0.1
  assert res["loss_err"] < 1e-5
  assert res["grad_err"] < 1e-4, res


def test_splash_attention_runs_per_device_under_the_mesh(eight_devices):
  """Loss and gradients with `attention_impl="splash"` under the (2, 2, 2) mesh in context equal
  the XLA path on one device, and the kernel sits inside a per-device computation (on a TPU, XLA
  refuses to partition a Mosaic kernel)."""
  res = eight_devices["splash"]
  assert res["per_device"]
  assert res["grad_norm"] > 0.1
  assert res["loss_err"] < 1e-5
  assert res["grad_err"] < 1e-4, res


def test_parameters_are_really_split(eight_devices):
  meshes = eight_devices["meshes"]
  # mlp/up/kernel [d_model=32, mlp=64]: d_model over fsdp, mlp over tensor.
  assert meshes["data"]["mlp_up_shard_shape"] == [32, 64]
  assert meshes["fsdp"]["mlp_up_shard_shape"] == [8, 64]
  assert meshes["tensor"]["mlp_up_shard_shape"] == [16, 32]
  # vocab 11 does not divide by tensor=2: replicated along vocab, still split over fsdp.
  assert meshes["tensor"]["head_kernel_spec"] == str(P("fsdp", None))
  assert meshes["tensor"]["embedding_spec"] == str(P(None, "fsdp"))


def test_init_sharded_equals_init(eight_devices):
  res = eight_devices["meshes"]["tensor"]
  assert res["init_sharded_err"] == 0.0
  assert res["init_sharded_as_requested"]


def test_checkpoint_written_under_one_mesh_restores_under_another(eight_devices):
  ckpt = eight_devices["checkpoint"]
  assert ckpt["err"] == 0.0
  assert ckpt["same_structure"]
  assert ckpt["restored_as_requested"]
  assert ckpt["adam_mu_fast_weight_o_spec"] == str(P("tensor", "fsdp"))


def test_mesh_errors_name_the_config_fields(eight_devices):
  errors = eight_devices["errors"]
  assert "config.mesh.data" in errors["make_mesh"] and "[1, 2, 4, 8]" in errors["make_mesh"]
  msg = errors["check_divisibility"]
  assert "config.batch_size=6" in msg and "config.mesh.data * config.mesh.fsdp" in msg
  assert "config.model.num_heads=3" in msg and "config.mesh.tensor=2" in msg
  assert "config.model.d_model" not in msg  # fsdp=2 divides d_model=30


# ----------------------------------------------------------------------------- one device


def test_rules_follow_parameter_paths_into_optimizer_state():
  mesh = sharding.make_mesh()
  params = jax.eval_shape(lambda key: sleep_jax.init(CONFIG, key), jax.random.key(0))
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  shardings = sharding.param_shardings({"params": params, "opt": opt_state}, mesh)
  for tree in (shardings["params"], shardings["opt"][0].mu, shardings["opt"][0].nu):
    w = tree.weights
    assert w["block_0"]["mlp"]["up"]["kernel"].spec == P("fsdp", "tensor")
    assert w["block_0"]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert w["block_0"]["attention"]["q"]["kernel"].spec == P("fsdp", "tensor")
    assert w["block_0"]["attention"]["o"]["kernel"].spec == P("tensor", "fsdp")
    assert w["block_1"]["fast_weight"]["qkv"]["kernel"].spec == P("fsdp", None)
    assert w["block_1"]["fast_weight"]["beta"]["kernel"].spec == P("fsdp", "tensor")
    assert w["block_1"]["fast_weight"]["A_log"].spec == P()
    assert w["block_1"]["mixer_norm"]["scale"].spec == P()
    assert w["embedding"]["embedding"].spec == P("tensor", "fsdp")
  assert shardings["opt"][0].count.spec == P()


def test_state_cache_and_batch_shardings():
  mesh = sharding.make_mesh()
  params = sleep_jax.init(CONFIG, jax.random.key(0))
  state = sharding.state_shardings(sleep_jax.init_state(params, 4), mesh)
  assert state[0] is None and state[1].spec == P(("data", "fsdp"), "tensor", None, None)
  cache = sharding.cache_shardings(sleep_jax.init_cache(params, 4), mesh)
  assert cache.layers[0]["k"].spec == P(("data", "fsdp"), None, "tensor", None)
  assert cache.length.spec == P()
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  local = {"tokens": np.arange(12, dtype=np.int32).reshape(4, 3), "loss_mask": np.ones(4, bool)}
  batch = sharding.global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
  assert isinstance(batch["loss_mask"], jax.Array) and batch["loss_mask"].shape == (4,)


def test_make_mesh_validates_sizes():
  count = jax.device_count()
  mesh = sharding.make_mesh(-1, 1, 1)
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.shape["data"] == count
  with pytest.raises(ValueError, match="config.mesh.fsdp must be a positive int or -1"):
    sharding.make_mesh(1, 0, 1)
  with pytest.raises(ValueError, match="only one of config.mesh"):
    sharding.make_mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="config.mesh.data=-1 has no valid size"):
    sharding.make_mesh(-1, count + 1, 1)
  with pytest.raises(ValueError, match="multiple of dcn_data"):
    sharding.make_mesh(count, 1, 1, dcn_data=2 * count)


def test_check_divisibility_accepts_a_run_the_mesh_divides():
  mesh = sharding.make_mesh()
  sharding.check_divisibility(mesh, 3, CONFIG)


def test_maybe_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  monkeypatch.setattr(sharding, "_DISTRIBUTED_STARTED", False)
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(sharding, "_on_tpu_vm", lambda: False)
  assert sharding.maybe_initialize_distributed() is False and not calls  # one machine: no-op
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert sharding.maybe_initialize_distributed() is False and not calls  # one task: no-op
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert sharding.maybe_initialize_distributed() is True and calls == [1]
  assert sharding.maybe_initialize_distributed() is True and calls == [1]  # idempotent


# ----------------------------------------------------------------------------- multislice

MULTISLICE = """
import json
import numpy as np
from jax.experimental import topologies
from sleep_jax import sharding
topo = topologies.get_topology_desc("v5e:2x4", "tpu", chips_per_host_bounds=(2, 2, 1), num_slices=2)
mesh = sharding.make_mesh(-1, 2, 1, dcn_data=2, devices=topo.devices)
slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
print(json.dumps({"shape": dict(mesh.shape), "slices": slices.tolist()}))
"""


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_multislice_mesh_puts_slices_along_data():
  # Two compile-only v5e-8 slices described by libtpu (no TPU needed, nothing compiled).
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
             TPU_ACCELERATOR_TYPE="v5litepod-8")
  proc = subprocess.run([sys.executable, "-c", MULTISLICE], capture_output=True, text=True,
                        env=env, timeout=300, cwd=WORKER.parent.parent)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["shape"] == {"data": 8, "fsdp": 2, "tensor": 1}
  slices = np.array(out["slices"])
  # Only the data axis crosses slices: its first half on slice 0, second half on slice 1.
  assert (slices[:4] == 0).all() and (slices[4:] == 1).all()
