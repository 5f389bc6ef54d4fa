"""The ahead-of-time memory check (experiments/aot.py).

Topology parsing and the memory arithmetic run everywhere; compiling for a real TPU topology
needs libtpu and is marked `tpu_aot` (run with `pytest -m tpu_aot tests/test_aot.py`).
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import aot
import sleep_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


@pytest.mark.parametrize("name,libtpu_name,chips,hbm", [
    ("v5e-1", "v5e:1x1", 1, 16),
    ("v5e-8", "v5e:2x4", 8, 16),
    ("v5litepod-16", "v5e:4x4", 16, 16),
    ("v6e-256", "v6e:16x16", 256, 32),
    ("v5p-8", "v5p:2x2x1", 4, 95),
    ("v5p-16", "v5p:2x2x2", 8, 95),
    ("v5p-128", "v5p:4x4x4", 64, 95),
    ("v4-32", "v4:2x2x4", 16, 32),
    ("v6e:2x4", "v6e:2x4", 8, 32),
])
def test_parse_topology(name, libtpu_name, chips, hbm):
  topology = aot.parse_topology(name)
  assert (topology.libtpu_name, topology.chips, topology.chip.hbm_gib) == (libtpu_name, chips, hbm)
  # The slice's sides multiply to the chip count.
  sides = [int(s) for s in topology.libtpu_name.split(":")[1].split("x")]
  assert jnp.prod(jnp.array(sides)) == chips


@pytest.mark.parametrize("name,match", [
    ("v5e8", "expected <type>-<size>"),
    ("tpu-8", "unknown TPU type"),
    ("v3-8", "unknown TPU type"),
    ("v5p-7", "multiple of 2"),
    ("v5e-12", "powers of two"),
])
def test_parse_topology_rejects(name, match):
  with pytest.raises(ValueError, match=match):
    aot.parse_topology(name)


def test_memory_report_counts_bytes():
  # One float32 [512, 256] argument (exactly 0.5 MiB) and an output of the same size.
  x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
  compiled = jax.jit(lambda a: a * 2 + 1).lower(x).compile()
  report = aot.memory_report(compiled, hbm_gib=1e-3)
  assert report["arguments_gib"] * aot.GIB == 512 * 256 * 4
  assert report["outputs_gib"] * aot.GIB == 512 * 256 * 4
  assert report["total_gib"] >= report["arguments_gib"] + report["outputs_gib"] - report["aliased_gib"]
  assert report["fits"] is True  # 1 MiB + code is under 1e-3 GiB (1.05 MB)
  assert aot.memory_report(compiled, hbm_gib=1e-4)["fits"] is False


def test_model_config_is_what_a_tpu_would_pick():
  """Unset dtype and chunk_size, and delta_impl "auto", become the TPU's (bfloat16, its default
  chunk, the chunked op), not the host's (on a CPU host: float32, chunk 16 or 32, the scan
  outside differentiation); values the config sets are kept."""
  from experiments.configs import multi_hop  # pylint: disable=import-outside-toplevel
  config = multi_hop.get_config("smoke")
  _, model = aot.build_model_config(config)
  assert model.dtype == "bfloat16" and model.delta_impl == "chunked"
  assert model.chunk_size == sleep_jax.ops.default_chunk_size("tpu")
  config.model.chunk_size, config.model.dtype = 16, "float32"
  _, model = aot.build_model_config(config)
  assert (model.chunk_size, model.dtype) == (16, "float32")


def _run_aot(tmp_path, *overrides):
  out = tmp_path / "rows.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.aot",
       "--config=experiments/configs/multi_hop.py:smoke", "--topology=v5e-8", f"--json={out}",
       *overrides],  # a later --topology wins
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (row,) = json.loads(out.read_text())
  assert ("| fits |" if row["fits"] else "| does not fit |") in proc.stdout
  return row


@pytest.mark.tpu_aot
@needs_libtpu
def test_aot_compiles_for_v5e_and_fsdp_splits_the_state(tmp_path):
  data = _run_aot(tmp_path)
  assert data["chips"] == 8 and "v5 lite" in data["device_kind"].lower()
  assert data["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert data["fits"] and data["total_gib"] < 16
  # Replicated float32 state: parameters plus Muon/AdamW moments, 2x to 3x the parameter bytes.
  params_bytes = 4 * data["parameters"]
  assert 2 * params_bytes <= data["arguments_gib"] * aot.GIB <= 3.5 * params_bytes + 1e5

  fsdp = _run_aot(tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=8")
  assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # FSDP splits the big matrices eight ways; small vectors and the batch stay whole.
  assert fsdp["arguments_gib"] < 0.4 * data["arguments_gib"]


@pytest.mark.tpu_aot
@needs_libtpu
def test_aot_compiles_splash_attention_per_device(tmp_path):
  """The Mosaic splash kernel compiles inside the sharded train step (XLA refuses to partition a
  Mosaic kernel, so this fails unless the step is traced with the mesh in context) on a data-
  and a tensor-parallel mesh."""
  for mesh in (("--config.mesh.data=8",),
               ("--config.mesh.data=4", "--config.mesh.tensor=2", "--config.model.num_heads=4")):
    row = _run_aot(tmp_path, "--config.model.attention_impl=splash", *mesh)
    assert row["fits"] and row["mesh"]["data"] * row["mesh"]["tensor"] == 8


@pytest.mark.tpu_aot
@needs_libtpu
def test_aot_reports_a_step_the_compiler_refuses(tmp_path):
  # 16384 sequences on one v5e chip: the temporaries alone pass its 16 GiB.
  row = _run_aot(tmp_path, "--topology=v5e-1", "--config.batch_size=16384")
  assert row["fits"] is False and "RESOURCE_EXHAUSTED" in row["compiler_error"]
  assert row["temporaries_gib"] > 16
  # Arguments counted from the shardings: int32 tokens and targets, bool mask, plus the state.
  batch_bytes = 16384 * row["seq_len"] * (4 + 4 + 1)
  assert batch_bytes < row["arguments_gib"] * aot.GIB < batch_bytes + 16 * row["parameters"]


@pytest.mark.tpu_aot
@needs_libtpu
def test_attention_memory_table_splash_against_xla(tmp_path):
  """benchmarks/attention_tpu_memory: on a v5e chip the splash kernel's forward+backward needs a
  small fraction of the temporaries of XLA's attention, which holds the [B H T T] scores."""
  out = tmp_path / "memory.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.attention_tpu_memory", "--seq_lens=2048",
       "--head_dims=128", "--batch=2", "--heads=4", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = {(r["impl"], r["mask"]): r for r in json.loads(out.read_text())["rows"]}
  assert len(rows) == 4 and all(r["fits"] for r in rows.values())
  # One float32 [B H T T]. (At T = 1024 the compiler needs no temporaries for either.)
  scores_mib = 2 * 4 * 2048 * 2048 * 4 / 2 ** 20
  for mask in ("causal", "sliding"):
    assert rows[("xla", mask)]["temp_mib"] >= scores_mib
    assert rows[("splash", mask)]["temp_mib"] < scores_mib / 8
