"""Device meshes and shardings: data parallel, FSDP and tensor parallel over one 3-axis mesh.

The mesh has the axes `("data", "fsdp", "tensor")`:

* `data`: each device holds a full replica of the parameters and a share of the batch;
* `fsdp`: parameters (and the optimiser state that mirrors them) are split along their model-width
  dimension, and the batch is split over this axis too; XLA gathers each weight where it is used;
* `tensor`: heads and MLP hidden units are split, so each device runs a slice of every layer.

Every array dimension has a *logical* name (`batch`, `embed`, `heads`, ...); `RULES` maps logical
names to mesh axes and `PARAM_AXES` gives the logical names of every parameter, found by the end of
its path in the pytree. Because parameters are found by path suffix, the same function shards the
parameters and any optimiser state that mirrors them (Adam moments, Muon momenta, ...). A dimension
that a mesh axis does not divide is replicated over that axis instead of failing: for instance a
task vocabulary of 7 tokens stays whole under `tensor=2`. `check_divisibility` rejects the cases
where that would silently waste the mesh (batch, heads, d_model, MLP width).

Layout of the parameters (our choice, in the style of Megatron-LM's column/row-parallel split):

| parameter | shape | logical axes | mesh axes |
|---|---|---|---|
| `embedding/embedding` | `[vocab, m]` | `vocab, embed` | `tensor, fsdp` |
| `head/kernel` | `[m, vocab]` | `embed, vocab` | `fsdp, tensor` |
| `attention/{q,k,v}/kernel`, `fast_weight/gate/kernel` | `[m, h*d]` | `embed, heads` | `fsdp, tensor` |
| `attention/o/kernel`, `fast_weight/o/kernel` | `[h*d, m]` | `heads, embed` | `tensor, fsdp` |
| `fast_weight/{beta,alpha}/kernel` | `[m, h]` | `embed, heads` | `fsdp, tensor` |
| `fast_weight/qkv/kernel` | `[m, 3*h*d]` | `embed, qkv` | `fsdp, -` |
| `fast_weight/conv/kernel` | `[width, 3*h*d]` | `-, qkv` | `-, -` |
| `mlp/{gate,up}/kernel` | `[m, mlp]` | `embed, mlp` | `fsdp, tensor` |
| `mlp/down/kernel` | `[mlp, m]` | `mlp, embed` | `tensor, fsdp` |
| norms, `A_log`, `dt_bias`, anything else | | | replicated |

The fused fast-weight projection `[m, 3*h*d]` is not split over `tensor`: its output is cut into
q, k and v, and contiguous blocks of it would not line up with heads (a device would hold all of q
and half of k). Replicating it over `tensor` costs a little redundant compute but lets every device
slice its own heads out of q, k, v with no communication.

Activations: batches `[b T]` are split over `("data", "fsdp")`; the fast-weight state `[b h k v]`
over batch and heads; the window cache's K/V `[b c h d]` likewise.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sleep_jax import model as model_lib
from sleep_jax.config import ModelConfig

AXES = ("data", "fsdp", "tensor")

# Logical dimension name -> mesh axis (or tuple of axes, outermost first, or None: replicated).
RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "qkv": None,
    "length": None,
    "cache_slots": None,
    "head_dim": None,
    "conv": None,
}

# Parameter path suffix (a regular expression over "/"-joined names) -> logical axes per dimension.
PARAM_AXES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r"embedding/embedding", ("vocab", "embed")),
    (r"head/kernel", ("embed", "vocab")),
    (r"attention/(q|k|v)/kernel", ("embed", "heads")),
    (r"attention/o/kernel", ("heads", "embed")),
    (r"fast_weight/qkv/kernel", ("embed", "qkv")),
    (r"fast_weight/conv/kernel", ("conv", "qkv")),
    (r"fast_weight/(gate|beta|alpha)/kernel", ("embed", "heads")),
    (r"fast_weight/o/kernel", ("heads", "embed")),
    (r"mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"mlp/down/kernel", ("mlp", "embed")),
)
_PARAM_PATTERNS = tuple((re.compile(rf"(^|/){pattern}$"), axes) for pattern, axes in PARAM_AXES)

STATE_AXES = ("batch", "heads", "head_dim", "head_dim")        # fast-weight state [b h k v]
CACHE_KV_AXES = ("batch", "cache_slots", "heads", "head_dim")  # attention K/V [b c h d]
CACHE_CONV_AXES = ("batch", "conv", "qkv")                     # short-conv tail [b width-1 3hd]


# ----------------------------------------------------------------------------- mesh


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, dcn_data: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all devices).

  One size may be -1: it takes every device the other two leave. `data` counts all data-parallel
  replicas; with `dcn_data > 1` (multislice: several TPU slices joined over the data-centre
  network) `dcn_data` of them are laid across slices and `data // dcn_data` inside each slice, so
  only the gradient all-reduce crosses slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
      raise ValueError(f"config.mesh.{name} must be a positive int or -1 (all devices left), "
                       f"got {size!r}")
  if isinstance(dcn_data, bool) or not isinstance(dcn_data, int) or dcn_data < 1:
    raise ValueError(f"dcn_data (slices along the data axis) must be a positive int, got {dcn_data!r}")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"only one of config.mesh.data/fsdp/tensor may be -1, got {sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if count % fixed:
      raise ValueError(
          f"config.mesh.{'/'.join(n for n in sizes if n not in fill)} multiply to {fixed}, which "
          f"does not divide the {count} devices, so config.mesh.{fill[0]}=-1 has no valid size; "
          f"sizes that work multiply to a divisor of {count}: {_divisors(count)}")
    sizes[fill[0]] = count // fixed
  if math.prod(sizes.values()) != count:
    raise ValueError(
        f"config.mesh.data * config.mesh.fsdp * config.mesh.tensor = {sizes['data']} * "
        f"{sizes['fsdp']} * {sizes['tensor']} = {math.prod(sizes.values())} must equal the number "
        f"of devices, {count}; each size must be one of {_divisors(count)} (e.g. data=-1 with "
        f"fsdp * tensor in {_divisors(count)}, or data={count}, fsdp=1, tensor=1)")
  shape = (sizes["data"], sizes["fsdp"], sizes["tensor"])
  if dcn_data > 1:
    if sizes["data"] % dcn_data:
      raise ValueError(f"config.mesh.data={sizes['data']} must be a multiple of dcn_data="
                       f"{dcn_data} (data-parallel replicas are spread over the slices); "
                       f"valid data sizes: multiples of {dcn_data} dividing {count}")
    ici = (sizes["data"] // dcn_data, sizes["fsdp"], sizes["tensor"])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, 1, 1), devices)
  else:
    grid = mesh_utils.create_device_mesh(shape, devices)
  return Mesh(grid, AXES)


# ----------------------------------------------------------------------------- logical -> mesh


def _axis_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def logical_spec(shape: Sequence[int], logical: Sequence[Optional[str]], mesh) -> P:
  """PartitionSpec for `shape` given its logical axes on `mesh` (a `Mesh`, or the `AbstractMesh`
  seen while tracing); mesh axes that do not divide a dimension (or that an earlier dimension
  already uses) are dropped, so that dimension is replicated."""
  used: set[str] = set()
  spec = []
  for size, name in zip(shape, logical):
    target = RULES.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    # Keep the longest leading run of axes whose product divides the dimension.
    while axes and size % _axis_size(mesh, axes):
      axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _logical_sharding(x, logical, mesh: Mesh) -> NamedSharding:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != len(logical):
    return _replicated(mesh)
  return NamedSharding(mesh, logical_spec(shape, logical, mesh))


def _path_names(path) -> str:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return "/".join(names)


def _param_axes(path: str, ndim: int) -> Optional[tuple[Optional[str], ...]]:
  """Logical axes of the parameter whose "/"-joined path ends as in `PARAM_AXES`, else None."""
  for pattern, axes in _PARAM_PATTERNS:
    if len(axes) == ndim and pattern.search(path):
      return axes
  return None


def param_shardings(tree, mesh: Mesh):
  """`NamedSharding`s for every leaf of a pytree that holds model parameters.

  Works for `Params`, their `.weights`, optimiser states that mirror them, or a train state holding
  both: a leaf is matched by the end of its path (`.../block_0/attention/q/kernel`); unmatched leaves
  and scalars (step counters, ...) are replicated. Leaves may be arrays or `jax.ShapeDtypeStruct`.
  """

  def one(path, x):
    axes = _param_axes(_path_names(path), len(getattr(x, "shape", ())))
    return _replicated(mesh) if axes is None else _logical_sharding(x, axes, mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a `[b T]` batch array: examples over ("data", "fsdp")."""
  return NamedSharding(mesh, P(("data", "fsdp"), None))


def _batch_leaf_sharding(x, mesh: Mesh) -> NamedSharding:
  ndim = len(np.shape(x))
  if ndim == 0:
    return _replicated(mesh)
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def state_shardings(state, mesh: Mesh):
  """Shardings of a fast-weight state (the tuple from `init_state`): `[b h k v]` over batch and
  heads; `None` entries (attention blocks) stay `None`."""
  return jax.tree.map(lambda s: _logical_sharding(s, STATE_AXES, mesh), state)


def cache_shardings(cache: model_lib.WindowCache, mesh: Mesh) -> model_lib.WindowCache:
  """Shardings of a `WindowCache`: K/V `[b c h d]` over batch and heads, conv tails `[b w 3hd]`
  over batch, the length counter replicated."""
  layers = []
  for layer in cache.layers:
    layers.append({
        name: _logical_sharding(buf, CACHE_KV_AXES if name in ("k", "v") else CACHE_CONV_AXES, mesh)
        for name, buf in layer.items()})
  return cache.replace(layers=tuple(layers), length=_replicated(mesh))


# ----------------------------------------------------------------------------- data and params


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Global `jax.Array`s from this process's share of the batch (numpy arrays `[b_local ...]`).

  Every process passes its own rows; the global batch is their concatenation in process order,
  split over ("data", "fsdp"). With one process the local batch is the global batch.
  """
  out = {}
  for name, x in local_batch.items():
    x = np.asarray(x)
    out[name] = jax.make_array_from_process_local_data(_batch_leaf_sharding(x, mesh), x)
  return out


def init_sharded(config: ModelConfig, rng: jax.Array, mesh: Mesh) -> model_lib.Params:
  """`sleep_jax.init(config, rng)` with every parameter created directly in its shard.

  The initialiser is jitted with `out_shardings`, so no device ever holds the whole model; the
  values equal those of `sleep_jax.init` for the same `rng`.
  """

  def make(key):
    return model_lib.init(config, key)

  shardings = param_shardings(jax.eval_shape(make, rng), mesh)
  return jax.jit(make, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------- checks


def check_divisibility(mesh: Mesh, batch_size: int, model_config: ModelConfig) -> None:
  """Raises a ValueError naming the config fields when the mesh does not split the run evenly.

  Checks: the global batch by data * fsdp, the heads by tensor, d_model by fsdp (the dimension
  FSDP shards) and the MLP width by tensor. Vocabularies are not checked: a vocabulary the tensor
  axis does not divide is replicated (task vocabularies are small and fixed).
  """
  data, fsdp, tensor = (mesh.shape[a] for a in AXES)
  cfg = model_config
  problems = []
  if batch_size % (data * fsdp):
    problems.append(
        f"config.batch_size={batch_size} is not a multiple of config.mesh.data * config.mesh.fsdp "
        f"= {data} * {fsdp} = {data * fsdp}; use a batch size that is a multiple of {data * fsdp}, "
        f"or data * fsdp in {[d for d in _divisors(batch_size) if d <= mesh.size]}")
  if cfg.num_heads % tensor:
    problems.append(
        f"config.model.num_heads={cfg.num_heads} is not a multiple of config.mesh.tensor={tensor}; "
        f"tensor sizes that work: {_divisors(cfg.num_heads)}")
  if cfg.d_model % fsdp:
    problems.append(
        f"config.model.d_model={cfg.d_model} is not a multiple of config.mesh.fsdp={fsdp}; "
        f"fsdp sizes that work: {[d for d in _divisors(cfg.d_model) if d <= mesh.size]}")
  if any(has_mlp for _, has_mlp in cfg.block_kinds) and cfg.resolved_mlp_dim % tensor:
    problems.append(
        f"config.model.mlp_dim={cfg.resolved_mlp_dim} is not a multiple of config.mesh.tensor="
        f"{tensor}; tensor sizes that work: {[d for d in _divisors(cfg.resolved_mlp_dim) if d <= mesh.size]}")
  if problems:
    raise ValueError("mesh does not divide the run:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- multi-host

_DISTRIBUTED_STARTED = False


def _on_tpu_vm() -> bool:
  # TPU chips show up as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e, v5p, v6e); libtpu must be there
  # too, so that a GPU VM with VFIO passthrough is not mistaken for a TPU VM.
  if os.environ.get("TPU_SKIP_MDS_QUERY"):
    return False
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  if not chips:
    return False
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _multi_process_launcher() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return False


def maybe_initialize_distributed() -> bool:
  """Starts `jax.distributed` when this process is one of several (TPU VM, SLURM, Open MPI, or
  `JAX_COORDINATOR_ADDRESS` set); a no-op on a single machine and when already started.

  Call it first thing, before anything touches a JAX device. On a TPU VM it always initialises
  (JAX finds the slice's workers from the VM metadata; a one-host slice gets one process). Returns
  True when the distributed system is running.
  """
  global _DISTRIBUTED_STARTED
  if _DISTRIBUTED_STARTED or jax.distributed.is_initialized():
    _DISTRIBUTED_STARTED = True
    return True
  if not (_on_tpu_vm() or _multi_process_launcher()):
    return False
  jax.distributed.initialize()
  _DISTRIBUTED_STARTED = True
  return True
