"""What one call runs on an NVIDIA GPU, compiled from a CPU host: no GPU or driver needed.

With JAX's CUDA plugin installed (`pip install "jax-cuda12-plugin==$V" "jax-cuda12-pjrt==$V"`,
V the installed jax version) and a CUDA toolkit's `ptxas` that XLA can find (on the PATH or
under /usr/local/cuda; XLA turns its kernels' PTX into GPU code with it), XLA compiles for a GPU
described by its public figures (`--gpu`: H100 or H200) and the compiled program says, before
any GPU is lent, what a call will launch. XLA's dump of the program's thunk sequence (after
XLA has grouped kernels into command buffers, which run as CUDA graphs) is read back and counted
per call:

* `graphs`: command buffers launched (one CUDA graph launch each), and `graph kernels`: the
  kernels, copies and library calls inside them;
* `host thunks`: kernels, copies and library calls launched one by one from the host, outside any
  command buffer (inside a loop: once per iteration);
* `loops`: each `while` loop the host drives, as trip count x launches (graphs and host thunks)
  per iteration;
* device memory from XLA's buffer assignment (arguments, outputs, temporaries) and compile
  seconds on this host.

No timings: these are the structure a profile on the GPU would time. Targets (shapes only, no
arrays are made): `op` (`gated_delta_rule`, `--shape`, `--impl` chunked / unrolled / pallas /
scan, `--mode`), `wake` (a one-token `sleep_jax.wake` step of the wake_latency benchmark's sleep
model, state and cache donated), `full` (the same step of the full-attention model behind a KV
cache of `--context` tokens), `train` (the train_step benchmark's step of `--config` at
`--passes`; `--delta_unroll`, `--scan_layers` override the preset's), `boundary` (the
sleep_cost benchmark's GPU model at window `--window`: a wake prefill of the window, the
streaming path's boundary and `sleep_jax.sleep`, both at N = `--passes`), or `all`: the rows
behind the GPU goals (docs/performance.md). Models are configured as on a GPU
(`ModelConfig.for_backend("gpu")`: bf16, chunk 64, the chunked fast-weight op).

    python -m benchmarks.gpu_aot                                  # all, for an H200
    python -m benchmarks.gpu_aot --target=op --impl=unrolled --shape=4x4096x16x128 --mode=fwdbwd
    python -m benchmarks.gpu_aot --target=wake --keep_dump=/tmp/wake_dump   # keep XLA's dump
    python -m benchmarks.gpu_aot --target=train --delta_unroll=1024 --scan_layers=0
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sleep_jax
from sleep_jax import streaming
from sleep_jax.ops import gated_delta_rule

from benchmarks import common
from benchmarks import sleep_cost
from benchmarks import train_step

# The figures XLA's GPU compiler reads (SM count, shared memory, registers, compute capability
# choose launch dimensions and tiling; memory sizes bound buffer assignment). Public data-sheet
# values of the SXM cards.
_GPUS = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", memory_bytes=80 * 10 ** 9,
                 bandwidth=3.35e12),
    "h200": dict(description="NVIDIA H200", memory_bytes=141 * 10 ** 9, bandwidth=4.8e12),
}

_TARGET_CONFIG = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth:.0f}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{description}"
"""

TARGETS = ("all", "op", "wake", "full", "train", "boundary")
OP_IMPLS = ("chunked", "unrolled", "pallas", "scan")
COLUMNS = (("target", "target", ""), ("compile_s", "compile s", ".1f"),
           ("temp_gib", "temp GiB", ".2f"), ("argument_gib", "args GiB", ".2f"),
           ("graphs", "graphs", "d"), ("graph_kernels", "graph kernels", "d"),
           ("host_thunks", "host thunks", "d"), ("loops", "loops (trips x launches)", ""))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--target", choices=TARGETS, default="all")
  parser.add_argument("--gpu", choices=sorted(_GPUS), default="h200")
  parser.add_argument("--shape", default="4x16384x16x128", help="op: BxTxHxD (Dk = Dv = D)")
  parser.add_argument("--impl", choices=OP_IMPLS, default="chunked",
                      help="op: chunked, unrolled (chunked with its chunk loop written out), "
                      "pallas, scan")
  parser.add_argument("--unroll", default="full",
                      help="op: chunk steps per loop iteration of `unrolled`, an int >= 1 or "
                      "'full' (no loop)")
  parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd")
  parser.add_argument("--d_model", type=int, default=1024, help="wake/full: width")
  parser.add_argument("--heads", type=int, default=8, help="wake/full: heads")
  parser.add_argument("--layout", default="AGAG", help="wake: blocks of the sleep model")
  parser.add_argument("--window", type=int, help="wake: L (default 1024); boundary: L "
                      "(default 2048)")
  parser.add_argument("--vocab", type=int, default=32768, help="wake/full: vocabulary")
  parser.add_argument("--context", type=int, default=131072, help="full: cached tokens")
  parser.add_argument("--bf16_weights", action="store_true",
                      help="wake/full: weights cast once (sleep_jax.inference_params)")
  parser.add_argument("--config", default="350m", help="train: a benchmarks.train_step preset")
  parser.add_argument("--passes", type=int, help="train: N (default 1); boundary: N "
                      "(default 4)")
  parser.add_argument("--delta_unroll", type=int, default=1,
                      help="train/wake/full: ModelConfig.delta_unroll")
  parser.add_argument("--scan_layers", choices=("preset", "0", "1"), default="preset",
                      help="train: ModelConfig.scan_layers (default: the preset's)")
  parser.add_argument("--keep_dump", default=None,
                      help="copy XLA's dump of each compiled program here (one folder each)")
  parser.add_argument("--out_dir", default=os.path.join("benchmarks", "results"),
                      help="folder of the JSON result gpu_aot_<gpu>.json")
  parser.add_argument("--out", default=None, help="JSON path; overrides --out_dir")
  args = parser.parse_args(argv)
  args.shape = common.op_shape("--shape", args.shape)
  args.unroll = common.chunk_unroll("--unroll", args.unroll)
  if args.config not in train_step.PRESETS:
    raise ValueError(f"--config must be one of {sorted(train_step.PRESETS)}, got {args.config!r}")
  boundary = args.target == "boundary"
  args.window = args.window or (2048 if boundary else 1024)
  args.passes = args.passes or (4 if boundary else 1)
  for flag in ("d_model", "heads", "window", "vocab", "context", "passes", "delta_unroll"):
    common.check_int(f"--{flag}", getattr(args, flag), 1)
  if args.out is None:
    args.out = os.path.join(args.out_dir, f"gpu_aot_{args.gpu}.json")
  return args


# ----------------------------------------------------------------------------- the thunk sequence


@dataclasses.dataclass
class Thunk:
  """One entry of XLA's thunk sequence: a kernel, copy or library call, or a container."""

  id: int
  kind: str
  name: str
  indent: int
  children: list = dataclasses.field(default_factory=list)
  sections: dict = dataclasses.field(default_factory=dict)   # a while's condition / body
  section: Optional[str] = None


_THUNK_LINE = re.compile(r"^(\s*)(\d+): (k\w+)\s*\[[^\]]*\]\s*(\S*)")


def parse_thunks(text: str) -> list[Thunk]:
  """The top-level thunks of a `*.thunk_sequence*.txt` dump, with their nesting.

  A thunk is nested in the nearest thunk above it that is indented less; a `while` thunk's
  nested thunks go to the section (`condition:` or `body:`) last named.
  """
  roots, open_ = [], []
  for line in text.splitlines():
    label = line.strip()
    if label in ("condition:", "body:"):
      loop = next((t for t in reversed(open_) if t.kind == "kWhile"), None)
      if loop is None:
        raise ValueError(f"thunk sequence: {label!r} outside a while thunk")
      loop.section = label[:-1]
      loop.sections.setdefault(loop.section, [])
      continue
    match = _THUNK_LINE.match(line)
    if not match:
      continue
    thunk = Thunk(id=int(match.group(2)), kind=match.group(3), name=match.group(4),
                  indent=len(match.group(1)))
    while open_ and open_[-1].indent >= thunk.indent:
      open_.pop()
    if not open_:
      roots.append(thunk)
    elif open_[-1].section is not None:
      open_[-1].sections[open_[-1].section].append(thunk)
    else:
      open_[-1].children.append(thunk)
    open_.append(thunk)
  return roots


def trip_counts(metadata: str, hlo: str) -> dict[int, int]:
  """{thunk id: known trip count} of the while thunks, from the thunk metadata (id -> HLO
  instruction name) and the optimized HLO (`known_trip_count` of each while instruction)."""
  names = dict((int(i), n) for n, i in re.findall(
      r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)', metadata))
  counts = {}
  for line in hlo.splitlines():
    match = re.match(r'\s*(?:ROOT )?%(\S+) = .*\bwhile\(.*"known_trip_count":\{"n":"(\d+)"\}',
                     line)
    if match:
      counts[match.group(1)] = int(match.group(2))
  return {i: counts[n] for i, n in names.items() if n in counts}


# A container whose nested thunks are its own implementation: one launch.
_ONE_LAUNCH = ("kDynamicSliceFusion",)
_COUNTS = ("graphs", "graph_kernels", "host_thunks")


def count_launches(roots: Sequence[Thunk], trips: dict[int, int]) -> dict:
  """Per call: `graphs` (command buffers launched from the host), `graph_kernels` (thunks run
  inside them), `host_thunks` (thunks launched from the host one by one) and `loops`: each
  while loop's `trips` (None if unknown; such a loop is counted as one iteration) and the host
  launches (graphs and host thunks) of one iteration, `launches_per_iteration`."""
  loops = []

  def count(thunks: Sequence[Thunk], in_graph: bool) -> dict[str, int]:
    total = dict.fromkeys(_COUNTS, 0)

    def add(counts, times=1):
      for key in _COUNTS:
        total[key] += times * counts[key]

    for thunk in thunks:
      if thunk.kind == "kCommandBuffer":
        add(count(thunk.children, True))
        total["graphs"] += 0 if in_graph else 1
      elif thunk.kind == "kWhile":
        n = trips.get(thunk.id)
        body = count(thunk.sections.get("body", []), in_graph)
        condition = count(thunk.sections.get("condition", []), in_graph)
        add(body, 1 if n is None else n)
        add(condition, 1 if n is None else n + 1)
        loops.append({"trips": n, "launches_per_iteration": sum(
            c["graphs"] + c["host_thunks"] for c in (body, condition))})
      elif thunk.children and thunk.kind not in _ONE_LAUNCH:
        add(count(thunk.children, in_graph))
      else:
        total["graph_kernels" if in_graph else "host_thunks"] += 1
    return total

  totals = count(roots, False)
  return dict(totals, loops=loops)


# ----------------------------------------------------------------------------- compiling


class ToolchainMissing(RuntimeError):
  """JAX's CUDA plugin or a PTX compiler is missing: no row can compile."""


def plugin_installed() -> bool:
  """Whether JAX's CUDA plugin is importable (its parent package may be missing too)."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def check_plugin() -> None:
  if not plugin_installed():
    raise ToolchainMissing(
        "benchmarks.gpu_aot compiles for a GPU through JAX's CUDA plugin, which is not "
        f"installed: pip install 'jax-cuda12-plugin=={jax.__version__}' "
        f"'jax-cuda12-pjrt=={jax.__version__}' (no GPU needed; XLA also needs a CUDA "
        "toolkit's ptxas)")


def gpu_mesh(gpu: str) -> jax.sharding.Mesh:
  """A one-device mesh on a described (not present) GPU."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topology = topologies.get_topology_desc(
      platform="cuda", target_config=_TARGET_CONFIG.format(**_GPUS[gpu]), topology="1x1x1")
  return topologies.make_mesh(topology, (1,), ("gpu",))


def targeting(gpu: str):
  """A context in which lowering targets the described GPU (`_GPUS` key: h100, h200).

  From jax 0.11, Pallas' Triton lowering asks which GPU it compiles for and, with no GPU
  present, reads it from the device of the current abstract mesh (an empty mesh here, so
  nothing else about the lowering changes); jax 0.10 does not ask.
  """
  gpu_device = jax.sharding.AbstractDevice(
      device_kind=_GPUS[gpu]["description"], num_cores=None, platform="cuda")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((), (), abstract_device=gpu_device))


def _placed(mesh: jax.sharding.Mesh, tree):
  """Shapes and dtypes of `tree` on the mesh's device."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _read_one(folder: str, pattern: str) -> Optional[str]:
  paths = sorted(glob.glob(os.path.join(folder, pattern)))
  if not paths:
    return None
  with open(paths[0], encoding="utf-8") as f:
    return f.read()


def compile_for_gpu(jitted, args: tuple, keep_dump: Optional[str] = None) -> dict:
  """Compiles `jitted` for the arguments' (GPU) device and counts what one call launches."""
  with tempfile.TemporaryDirectory() as dump:
    start = time.perf_counter()
    try:
      compiled = jitted.lower(*args).compile(compiler_options={"xla_dump_to": dump})
    except Exception as err:  # pylint: disable=broad-except
      if "No PTX compilation provider" in str(err):
        raise ToolchainMissing(
            "XLA found no ptxas to compile the GPU kernels: install a CUDA toolkit's (e.g. "
            "pip install nvidia-cuda-nvcc-cu12) and put its bin folder on the PATH") from None
      raise
    seconds = time.perf_counter() - start
    sequence = (_read_one(dump, "*.thunk_sequence_after_thunk_passes.txt")
                or _read_one(dump, "*.thunk_sequence.txt"))
    if sequence is None:
      raise RuntimeError("XLA wrote no thunk sequence to its dump: this jax version's GPU "
                         "compiler does not dump one; the counts need it")
    trips = trip_counts(_read_one(dump, "*.thunk_metadata.txt") or "",
                        _read_one(dump, "*gpu_after_optimizations.txt") or "")
    if keep_dump:
      shutil.copytree(dump, keep_dump, dirs_exist_ok=True)
  memory = compiled.memory_analysis()
  gib = lambda n: n / 2 ** 30  # noqa: E731
  return dict(compile_s=seconds, temp_gib=gib(memory.temp_size_in_bytes),
              argument_gib=gib(memory.argument_size_in_bytes),
              output_gib=gib(memory.output_size_in_bytes),
              **count_launches(parse_thunks(sequence), trips))


# ----------------------------------------------------------------------------- targets


def op_job(mesh, shape: tuple[int, int, int, int], impl: str, mode: str,
           unroll: int | bool = True) -> tuple:
  """(label, jitted, abstract args) of `gated_delta_rule` in bf16 at the GPU's chunk size."""
  b, t, h, d = shape
  f32, bf16 = jnp.float32, jnp.bfloat16
  args = _placed(mesh, tuple(jax.ShapeDtypeStruct(s, dt) for s, dt in (
      ((b, t, h, d), bf16), ((b, t, h, d), bf16), ((b, t, h, d), bf16), ((b, t, h), f32),
      ((b, t, h), f32), ((b, h, d, d), f32))))
  run_impl, unroll = ("chunked", unroll) if impl == "unrolled" else (impl, 1)

  def forward(q, k, v, beta, log_alpha, state):
    return gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, impl=run_impl,
                            chunk_size=sleep_jax.ops.default_chunk_size("gpu"), unroll=unroll)

  if mode == "fwd":
    fn = jax.jit(forward)
  else:
    def total(*xs):
      o, state = forward(*xs)
      return jnp.sum(o.astype(f32)) + jnp.sum(state)
    fn = jax.jit(jax.grad(total, argnums=tuple(range(6))))
  label = f"op {impl}{'' if unroll in (1, True) else unroll} {mode} {'x'.join(map(str, shape))}"
  return label, fn, args


def step_job(mesh, args, full: bool) -> tuple:
  """(label, jitted, abstract args) of a one-token wake step, state and cache donated, as a GPU
  would configure it (bf16; this host's defaults would be a CPU's)."""
  cfg = sleep_jax.ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
                              layout=args.layout, window=args.window,
                              delta_unroll=args.delta_unroll).for_backend("gpu")
  if full:
    cfg = cfg.replace(layout="A" * len(args.layout), eviction="none")
  params = jax.eval_shape(lambda: sleep_jax.init(cfg, jax.random.key(0)))
  if args.bf16_weights:
    params = jax.eval_shape(sleep_jax.inference_params, params)
  state = jax.eval_shape(lambda: sleep_jax.init_state(params, 1))
  cache = jax.eval_shape(lambda: sleep_jax.init_cache(
      params, 1, args.context + 1 if full else None))
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  label = (f"full {cfg.layout} d={cfg.d_model} C={args.context}" if full else
           f"wake {cfg.layout} d={cfg.d_model} L={cfg.window}")
  label += " bf16-w" if args.bf16_weights else ""
  label += f" unroll={cfg.delta_unroll}" if cfg.delta_unroll != 1 else ""
  return (label, jax.jit(sleep_jax.wake, donate_argnums=(1, 2)),
          _placed(mesh, (params, state, cache, tokens)))


def train_job(mesh, name: str, n: int, delta_unroll: int, scan_layers: str) -> tuple:
  """(label, jitted, abstract args) of the train_step benchmark's step (AdamW, parameters and
  optimiser state donated) for preset `name` at its GPU batch, in bf16."""
  preset = train_step.PRESETS[name]
  changes = dict(delta_unroll=delta_unroll)
  if scan_layers != "preset":
    changes["scan_layers"] = scan_layers == "1"
  cfg = sleep_jax.ModelConfig(**dict(preset.config, **changes)).for_backend("gpu")
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  params = jax.eval_shape(lambda: sleep_jax.init(cfg, jax.random.key(0)))
  opt_state = jax.eval_shape(optimizer.init, params.weights)
  batch = common.abstract(train_step.random_batch(np.random.default_rng(0), preset,
                                                  preset.batch, cfg.vocab_size))
  label = (f"train {name} N={n} unroll={delta_unroll}"
           f"{' scan' if cfg.scan_layers else ''}")
  return (label, train_step.make_step(n, preset.consolidation, optimizer),
          _placed(mesh, (params, opt_state, batch)))


def boundary_jobs(mesh, window: int, n: int, delta_unroll: int) -> list[Callable[[], tuple]]:
  """The sleep_cost benchmark's GPU model (AGAGAGAG, d = 1024, 8 heads, vocabulary 32768, batch
  8, hard eviction) at window L: (label, jitted, abstract args) of a wake prefill of the window,
  the streaming boundary (`Stream`'s N - 1 passes and eviction) and `sleep` (N passes)."""
  cfg = sleep_jax.ModelConfig(vocab_size=32768, d_model=1024, num_heads=8, layout="AGAG" * 2,
                              window=window, delta_unroll=delta_unroll).for_backend("gpu")
  batch = 8
  params = jax.eval_shape(lambda: sleep_jax.init(cfg, jax.random.key(0)))
  state = jax.eval_shape(lambda: sleep_jax.init_state(params, batch))
  empty = jax.eval_shape(lambda: sleep_jax.init_cache(params, batch))
  at_boundary = jax.eval_shape(lambda: sleep_cost.boundary_input(params, batch,
                                                                 jax.random.key(0)))
  window_tokens = jax.ShapeDtypeStruct((batch, window), jnp.int32)
  suffix = f"L={window}" + (f" unroll={delta_unroll}" if delta_unroll != 1 else "")
  run_boundary = streaming._boundary  # pylint: disable=protected-access
  boundary = jax.jit(lambda p, s: run_boundary(p, s, n, True))
  return [
      lambda: (f"prefill {suffix}", jax.jit(sleep_jax.wake),
               _placed(mesh, (params, state, empty, window_tokens))),
      lambda: (f"boundary N={n} {suffix}", boundary, _placed(mesh, (params, at_boundary))),
      lambda: (f"sleep N={n} {suffix}", sleep_cost.sleep_fn(n),
               _placed(mesh, (params, state, window_tokens))),
  ]


def jobs(mesh, args) -> list[Callable[[], tuple]]:
  """The rows to compile: callables that return each row's (label, jitted, abstract args)."""
  if args.target == "op":
    return [lambda: op_job(mesh, args.shape, args.impl, args.mode, args.unroll)]
  if args.target in ("wake", "full"):
    return [lambda: step_job(mesh, args, full=args.target == "full")]
  if args.target == "boundary":
    return boundary_jobs(mesh, args.window, args.passes, args.delta_unroll)
  if args.target == "train":
    return [lambda: train_job(mesh, args.config, args.passes, args.delta_unroll,
                              args.scan_layers)]
  long, short = (4, 16384, 16, 128), (4, 4096, 16, 128)
  rows = [lambda impl=impl: op_job(mesh, long, impl, "fwd")
          for impl in ("chunked", "unrolled", "pallas")]
  rows += [lambda impl=impl: op_job(mesh, short, impl, "fwdbwd") for impl in ("chunked",
                                                                             "unrolled")]
  rows += [lambda: step_job(mesh, args, full=False), lambda: step_job(mesh, args, full=True)]
  rows += [lambda unroll=unroll: train_job(mesh, "350m", 1, unroll, "preset")
           for unroll in (1, train_step.UNROLLED)]
  for unroll in (1, train_step.UNROLLED):
    rows += boundary_jobs(mesh, 2048, 4, unroll)
  return rows


def _loops_text(loops: list[dict]) -> str:
  """Each loop as trips x launches per iteration; past three loops, their number (the JSON
  lists them all)."""
  if len(loops) > 3:
    return f"{len(loops)} loops"
  return ", ".join(f"{'?' if l['trips'] is None else l['trips']} x "
                   f"{l['launches_per_iteration']}" for l in loops) or "none"


def main(argv: Optional[Sequence[str]] = None) -> common.Results:
  args = parse_args(argv)
  check_plugin()
  results = common.Results("gpu_aot", args)
  results.meta.update(gpu=args.gpu, gpu_description=_GPUS[args.gpu]["description"])
  print(f"== gpu_aot: compiled on this host for one {_GPUS[args.gpu]['description']} "
        f"(no GPU used), jax={jax.__version__}")
  mesh = gpu_mesh(args.gpu)
  for index, build in enumerate(jobs(mesh, args)):
    label, jitted, abstract = build()
    keep = (os.path.join(args.keep_dump, f"{index:02d}_" + re.sub(r"\W+", "_", label))
            if args.keep_dump else None)
    try:
      with targeting(args.gpu):
        row = dict(target=label, **compile_for_gpu(jitted, abstract, keep))
    except ToolchainMissing:
      raise
    except Exception as err:  # pylint: disable=broad-except
      row = dict(target=label, error=common.describe_error(err))
      print(f"{label}: failed: {row['error']}")
    else:
      row["loops_text"] = _loops_text(row["loops"])
    results.add(row)
  shown = [dict(r, loops=r.get("loops_text")) for r in results.rows if "error" not in r]
  print(common.format_table(shown, COLUMNS))
  print("graphs: command buffers (CUDA graphs) launched per call; graph kernels: thunks run "
        "inside them; host thunks: launched one by one; loops: host-driven while loops, "
        "trips x launches per iteration")
  results.write()
  print(f"wrote {results.path}")
  return results


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    main(sys.argv[1:])
  except ToolchainMissing as err:
    sys.exit(str(err))
