r"""Ahead-of-time memory check: compiles a config's train step for a TPU topology, on any machine.

    python -m experiments.aot --config=experiments/configs/multi_hop.py:paper --topology=v5e-8
    python -m experiments.aot --config=experiments/configs/math.py:paper --topology=v6e-16,v5p-16
    python -m experiments.aot --config=experiments/configs/multi_hop.py:paper --topology=v5e-8 \
        --config.mesh.data=2 --config.mesh.fsdp=4 --json=aot.json

No TPU is needed: `libtpu` (installed by `pip install -e '.[tpu]'`) compiles for a described
topology while JAX itself runs on the CPU. For each topology it prints the mesh it laid out (from
`config.mesh`, as the trainer does) and the per-chip memory of the compiled step: arguments (the
train state and the batch), outputs, temporaries (activations kept for the backward pass,
gradients, optimiser work space) and their total, against the chip's HBM, then "fits" or "does not
fit".

The step compiled here is the trainer's update built from library pieces: `sleep_jax.loss` under
`jax.value_and_grad`, the optimiser of `sleep_jax.optim.make_optimizer` (Muon + AdamW), the
update, and a guard that keeps the old state when the loss or the update is not finite. The state
is donated, as in training, so outputs reuse the argument buffers. What the config leaves to
the library is made as on a TPU (`ModelConfig.for_backend("tpu")`), which is what the trainer
picks there: bfloat16 compute for an unset `model.dtype`, the TPU's chunk (64) for an unset
`model.chunk_size`, and the chunked fast-weight op for `model.delta_impl="auto"`.

Topologies: `v5e-N` / `v5litepod-N` and `v6e-N` count chips; `v4-N` and `v5p-N` count TensorCores
(two per chip, one JAX device per chip), as Cloud TPU names them. A raw libtpu topology name such
as `v5e:2x4` is accepted too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import sleep_jax
from sleep_jax import optim
from sleep_jax import sharding
from sleep_jax import tasks
from sleep_jax import train_lib

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str           # libtpu's topology prefix
  hbm_gib: float      # HBM per chip
  cores_per_chip: int  # how Cloud TPU counts the N of "<kind>-N"
  dims: int           # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
  chip_config: Optional[str] = None


CHIPS = {
    "v5e": Chip("v5e", 16, 1, 2),
    "v6e": Chip("v6e", 32, 1, 2),
    "v5p": Chip("v5p", 95, 2, 3, "megacore"),
    "v4": Chip("v4", 32, 2, 3, "megacore"),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str           # as given on the command line
  chip: Chip
  chips: int
  libtpu_name: str    # e.g. "v5e:2x4"
  host_bounds: tuple[int, int, int]


def _grid(chips: int, dims: int) -> list[int]:
  """Slice shape of `chips` chips: start from one chip (2-D) or 2x2x1 (3-D), double the smallest
  side (the last of equal sides) until the count is reached: 2x4, 4x4, 4x8 ...; 2x2x2, 2x2x4,
  2x4x4, 4x4x4 ..."""
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  if chips < 4 and dims == 3:
    raise ValueError(f"--topology: 3-D slices start at 4 chips, got {chips}")
  while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return shape


def parse_topology(name: str) -> Topology:
  """`v5e-8` -> 8 v5e chips as a 2x4 slice; `v5p-128` -> 64 v5p chips as 4x4x4; `v6e:2x4` raw."""
  raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name)
  named = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if not (raw or named):
    raise ValueError(f"--topology: expected <type>-<size> such as v5e-8, v5p-128, v6e-256 (or a "
                     f"libtpu name such as v5e:2x4), got {name!r}")
  kind = _ALIASES.get((raw or named).group(1), (raw or named).group(1))
  if kind not in CHIPS:
    raise ValueError(f"--topology: unknown TPU type {kind!r} in {name!r}; known: {sorted(CHIPS)}")
  chip = CHIPS[kind]
  if raw:
    shape = [int(s) for s in raw.group(2).split("x")]
    chips = 1
    for s in shape:
      chips *= s
  else:
    size = int(named.group(2))
    if size < 1 or size % chip.cores_per_chip:
      raise ValueError(f"--topology: {kind}-N counts TensorCores ({chip.cores_per_chip} per chip): "
                       f"N must be a positive multiple of {chip.cores_per_chip}, got {size}")
    chips = size // chip.cores_per_chip
    if chips & (chips - 1):
      raise ValueError(f"--topology: slice sizes are powers of two, got {chips} chips in {name!r}")
    shape = _grid(chips, chip.dims)
  # One host drives up to 8 chips on single-host v5e/v6e slices, 4 chips otherwise.
  if chips <= 4:
    bounds = (shape[0], shape[1] if len(shape) > 1 else 1, 1)
  elif chips == 8 and chip.dims == 2:
    bounds = (2, 4, 1)
  else:
    bounds = (2, 2, 1)
  return Topology(name, chip, chips, f"{kind}:{'x'.join(map(str, shape))}", bounds)


def _cloud_name(name: str) -> str:
  """The Cloud TPU accelerator type of a --topology value ("v5e-8" -> "v5litepod-8")."""
  match = re.fullmatch(r"v5e-(\d+)", name)
  return f"v5litepod-{match.group(1)}" if match else name


def topology_devices(topology: Topology) -> list:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"chips_per_host_bounds": topology.host_bounds}
  if topology.chip.chip_config:
    kwargs["chip_config_name"] = topology.chip.chip_config
  return list(topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs).devices)


# ----------------------------------------------------------------------------- the step


def build_model_config(config) -> tuple[Any, sleep_jax.ModelConfig]:
  """(task, ModelConfig) from an experiment config, with the choices the config leaves to the
  library (compute dtype, chunk length, fast-weight implementation) made as a TPU would make
  them, not as this host (maybe a CPU) would."""
  params = {k: (tuple(v) if isinstance(v, list) else v)
            for k, v in config.task.params.to_dict().items() if v is not None}
  task = tasks.get(config.task.name, **params)
  model = sleep_jax.ModelConfig(vocab_size=len(task.vocab), window=task.window,
                                **config.model.to_dict())
  return task, model.for_backend("tpu")


def compile_train_step(config, mesh):
  """Lowers and compiles one training update for `mesh`; returns (compiled, facts)."""
  task, model = build_model_config(config)
  sharding.check_divisibility(mesh, config.batch_size, model)
  o = config.optim
  # Peak learning rates as constants: the schedule changes no buffer size.
  tx = optim.make_optimizer(
      muon_lr=o.muon_lr, adam_lr=o.adam_lr, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
      muon_momentum=o.muon_momentum, ns_steps=o.ns_steps, adam_b1=o.adam_b1, adam_b2=o.adam_b2)
  n, grad_passes = config.n, config.get("grad_passes")
  layout = task.consolidation_windows

  def init_state(rng):
    weights = sleep_jax.init(model, rng).weights
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=weights,
                                opt_state=tx.init(weights),
                                rng=jax.random.key_data(rng))

  def loss_fn(weights, batch):
    params = sleep_jax.Params(weights=weights, config=model)
    return sleep_jax.loss(params, batch, n, consolidation_windows=layout,
                          grad_passes=grad_passes)

  def train_step(state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    weights = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(updates))
    new = train_lib.TrainState(step=state.step + 1, params=weights, opt_state=opt_state,
                               rng=state.rng)
    state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    return state, {"loss": loss, "accuracy": metrics["accuracy"]}

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = sharding.param_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  shape = (config.batch_size, task.seq_len)
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for name, dtype in (("tokens", jnp.int32), ("targets", jnp.int32),
                               ("loss_mask", jnp.bool_))}
  replicated = NamedSharding(mesh, P())
  facts = {
      "parameters": sum(x.size for x in jax.tree.leaves(abstract.params)),
      "seq_len": task.seq_len, "window": task.window, "n": n, "batch_size": config.batch_size,
      "layout": model.layout, "d_model": model.d_model, "dtype": model.dtype,
      "argument_bytes": _shard_bytes((abstract, batch)),
  }
  start = time.perf_counter()
  try:
    # The mesh in context lets kernels that XLA cannot partition (splash attention) run per
    # device under `shard_map`.
    with jax.set_mesh(mesh):
      compiled = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated),
                         donate_argnums=0).lower(abstract, batch).compile()
  except jax.errors.JaxRuntimeError as error:
    # The TPU compiler refuses a program whose temporaries alone exceed HBM; that is an answer.
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    compiled = None
    facts["compiler_error"] = str(error).strip()
  facts["compile_s"] = round(time.perf_counter() - start, 1)
  return compiled, facts


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def gib_in(message: str, what: str) -> Optional[float]:
  """"... HLO temporaries (43.87G) ..." -> 43.87 (XLA prints binary units: K, M, G = 2^10...)."""
  match = re.search(re.escape(what) + r"\s*\(([\d.]+)([KMGT])i?B?\)", message)
  if not match:
    return None
  scale = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10}[match.group(2)]
  return float(match.group(1)) * scale


def memory_report(compiled, hbm_gib: float) -> dict:
  """Per-chip bytes of a compiled SPMD step (every chip runs the same program)."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("the compiler returned no memory analysis for this executable")
  args, outs = m.argument_size_in_bytes, m.output_size_in_bytes
  alias, temp, code = m.alias_size_in_bytes, m.temp_size_in_bytes, m.generated_code_size_in_bytes
  total = args + outs - alias + temp + code
  return {"arguments_gib": args / GIB, "outputs_gib": outs / GIB, "aliased_gib": alias / GIB,
          "temporaries_gib": temp / GIB, "code_gib": code / GIB, "total_gib": total / GIB,
          "hbm_gib": hbm_gib, "fits": total <= hbm_gib * GIB}


def check(config, config_name: str, topology_name: str) -> dict:
  """Compiles `config`'s step for one topology; returns one report row."""
  topology = parse_topology(topology_name)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=devices)
  compiled, facts = compile_train_step(config, mesh)
  row = {"config": config_name, "topology": topology_name, "chips": len(devices),
         "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape)}
  row.update(facts)
  if compiled is not None:
    row.update(memory_report(compiled, topology.chip.hbm_gib))
    return row
  # Refused by the compiler: the arguments (counted from the shardings) plus the temporaries it
  # reported are a lower bound of what the step needs.
  args = facts["argument_bytes"] / GIB
  temps = gib_in(facts["compiler_error"], "HLO temporaries")
  row.update({"arguments_gib": args, "outputs_gib": None, "aliased_gib": None,
              "temporaries_gib": temps, "code_gib": None,
              "total_gib": None if temps is None else args + temps,
              "hbm_gib": topology.chip.hbm_gib, "fits": False})
  return row


def _gib(value: Optional[float], lower_bound: bool = False) -> str:
  if value is None:
    return "-"
  return f"{'>= ' if lower_bound else ''}{value:.2f}"


def format_row(row: dict) -> str:
  mesh = "x".join(str(row["mesh"][a]) for a in sharding.AXES)
  verdict = "fits" if row["fits"] else "does not fit"
  refused = "compiler_error" in row
  per_chip = row["batch_size"] // (row["mesh"]["data"] * row["mesh"]["fsdp"])
  return (f"| {row['config']} | {row['topology']} | {mesh} | {per_chip} "
          f"| {_gib(row['arguments_gib'])} | {_gib(row['outputs_gib'])} "
          f"| {_gib(row['temporaries_gib'])} | {_gib(row['total_gib'], refused)} "
          f"| {row['hbm_gib']:g} | {verdict} |")


TABLE_HEADER = ("| config | topology | mesh (data x fsdp x tensor) | sequences per chip | arguments "
                "GiB | outputs GiB | temporaries GiB | total GiB | HBM GiB | verdict |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------- command line


def _define_flags():
  # Defined when run as a program only, so that importing this module (tests, notebooks) leaves
  # the global absl flags alone (the trainer defines a --config flag too).
  config_flags.DEFINE_config_file(
      "config", None, "experiment config file and preset, e.g. experiments/configs/math.py:paper",
      lock_config=True)
  flags.DEFINE_list("topology", ["v5e-8"], "TPU slices to compile for, comma-separated: v5e-8, "
                    "v5p-128, v6e-256, ... (or libtpu names such as v5e:2x4)")
  flags.DEFINE_string("json", None, "also write the rows to this JSON file")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, topologies = flags.FLAGS.config, flags.FLAGS.topology
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/configs/math.py:paper")
  # JAX runs on the CPU; libtpu only compiles. Compile-only use of libtpu needs neither TPU
  # metadata nor the lock a TPU-attached process takes, so another JAX process may run alongside.
  jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Without these libtpu looks for the TPU VM it runs on and logs warnings; they change nothing
  # about what it compiles for the topology it is given.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _cloud_name(topologies[0]))
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("experiments.aot: error: libtpu is not installed; pip install -e '.[tpu]' (or "
          "pip install 'jax[tpu]')", file=sys.stderr)
    sys.exit(2)
  # "experiments/configs/math.py:paper" -> "math:paper"
  config_name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
  config_name = config_name.replace(".py", "")
  rows = []
  print(TABLE_HEADER, flush=True)
  for topology in topologies:
    try:
      row = check(config, config_name, topology)
    except ValueError as error:
      print(f"experiments.aot: error: {topology}: {error}", file=sys.stderr)
      sys.exit(2)
    rows.append(row)
    print(format_row(row), flush=True)
    if flags.FLAGS.json:  # after every row: a long compile may be interrupted
      with open(flags.FLAGS.json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
  for row in rows:
    head = (f"{row['topology']}: {row['chips']} x {row['device_kind']}, mesh {row['mesh']}, "
            f"{row['parameters']:,} parameters, T={row['seq_len']} L={row['window']} n={row['n']} "
            f"batch {row['batch_size']}, {row['dtype']}; ")
    if "compiler_error" in row:
      print(head + f"the compiler refused it after {row['compile_s']} s: "
            f"{row['compiler_error'].splitlines()[0]}")
      continue
    print(head + f"compiled in {row['compile_s']} s; {row['aliased_gib']:.2f} GiB of outputs "
          f"reuse donated arguments, code {row['code_gib']:.2f} GiB; total "
          f"{row['total_gib']:.2f} of {row['hbm_gib']:g} GiB per chip: "
          f"{'fits' if row['fits'] else 'does not fit'}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
