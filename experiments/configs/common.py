"""The config schema shared by every experiment, and the preset/variant machinery.

A config file `experiments/configs/<task>.py` defines `get_config(arg)` where `arg` is
`"<preset>"` or `"<preset>,<variant>"`: the preset sets sizes (`smoke`, `small`, `paper`), the
variant turns the model into one of the baselines of `experiments/configs/baselines.py`. Every
field exists in every config, so any of them can be overridden on the command line
(`--config.n=4 --config.model.d_model=128 --config.task.params.t=16`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from ml_collections import config_dict

from experiments.configs import baselines
from sleep_jax import tasks
from sleep_jax.config import ModelConfig

PRESETS = ("smoke", "small", "paper")

# Learning rates of every `small` preset: the best of three pairs for a d = 64 model trained for a
# few hundred steps on Rule 110 at N = 1 (docs/results.md, calibration log). The paper's pairs
# (Muon 2e-3 / AdamW 5e-5; 1e-3 / 5e-5 for math), kept in the `paper` presets, learn too slowly
# for budgets this short.
SMALL_LRS = {"muon_lr": 1e-2, "adam_lr": 1e-3}

# Python types of the ModelConfig fields whose default is None (ml_collections needs a type to
# accept an override of a None field).
_NONE_FIELD_TYPES = {"head_dim": int, "mlp_dim": int, "dtype": str, "attention_impl": str,
                     "chunk_size": int}
_TASK_PARAM_TYPES = {"int": int, "tuple": tuple, "str": str}


def model_defaults() -> config_dict.ConfigDict:
  """Every ModelConfig field except vocab_size and window (those come from the task)."""
  model = config_dict.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    if field.name in ("vocab_size", "window"):
      continue
    if field.default is None:
      model[field.name] = config_dict.placeholder(_NONE_FIELD_TYPES[field.name])
    else:
      model[field.name] = field.default
  return model


def task_defaults(name: str, **overrides) -> config_dict.ConfigDict:
  """Every parameter of task `name` with its default, then `overrides`, as a ConfigDict."""
  cls = tasks.TASKS[name]
  params = config_dict.ConfigDict()
  for field in dataclasses.fields(cls):
    if not field.init:
      continue
    if field.default is None:
      kind = field.metadata.get("kind", "int")
      params[field.name] = config_dict.placeholder(_TASK_PARAM_TYPES[kind])
    else:
      params[field.name] = field.default
  for key, value in overrides.items():
    if key not in params:
      raise ValueError(f"task {name} has no parameter {key!r}; valid: {sorted(params)}")
    params[key] = value
  return params


def base_config(task: str) -> config_dict.ConfigDict:
  """All fields with neutral defaults; task files fill in the presets."""
  c = config_dict.ConfigDict()
  c.task = config_dict.ConfigDict({"name": task, "params": task_defaults(task)})
  c.model = model_defaults()
  c.n = 1                       # sleep passes per consolidation window (1 = ordinary hybrid)
  c.grad_passes = config_dict.placeholder(int)  # truncated BPTT over the last k passes
  c.seed = 0                    # parameter init (and data order unless data_seed is set)
  c.data_seed = config_dict.placeholder(int)
  c.batch_size = 32             # global batch size, split across data-parallel devices
  c.steps = 1000
  # Compute-matched baseline: when set, `steps` is the step count of a run with this many
  # passes, and the trainer runs as many steps as match its training FLOPs at `n`.
  c.compute_match_n = config_dict.placeholder(int)

  c.optim = config_dict.ConfigDict()
  c.optim.muon_lr = 2e-3
  c.optim.adam_lr = 5e-5
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.final_lr_fraction = 0.1
  c.optim.muon_momentum = 0.95
  c.optim.ns_steps = 5
  c.optim.adam_b1 = 0.9
  c.optim.adam_b2 = 0.95

  c.eval_every = 500            # steps between evaluations (and one at the end); 0: end only
  c.eval_examples = 512         # first examples of the fixed test split
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.log_every = 50
  c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.data_dir = config_dict.placeholder(str)  # stored test splits; None: generate on the fly
  c.data_workers = 0            # Grain worker processes for training batches (0: a thread)
  # JAX's persistent compilation cache (a local path or gs:// URL); restarts after preemption
  # then skip compiling. None: off.
  c.compilation_cache_dir = config_dict.placeholder(str)
  return c


def parse_arg(arg: str | None, default: str = "small") -> tuple[str, str | None]:
  """`"small"` -> ("small", None); `"small,full_attention"` -> ("small", "full_attention")."""
  arg = (arg or default).strip()
  preset, _, variant = arg.partition(",")
  preset = preset.strip() or default
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} in config argument {arg!r}; presets: "
                     f"{list(PRESETS)} (optionally followed by ,<variant> with variant one of "
                     f"{sorted(baselines.VARIANTS)})")
  variant = variant.strip() or None
  if variant is not None and variant not in baselines.VARIANTS:
    raise ValueError(f"unknown variant {variant!r} in config argument {arg!r}; variants: "
                     f"{sorted(baselines.VARIANTS)}")
  return preset, variant


def build(task: str, arg: str | None,
          presets: Mapping[str, Callable[[config_dict.ConfigDict], None]]) -> config_dict.ConfigDict:
  """base_config(task), then the chosen preset's function, then the variant."""
  preset, variant = parse_arg(arg)
  config = base_config(task)
  presets[preset](config)
  if variant is not None:
    baselines.apply(config, variant)
  return config


def set_model(config: config_dict.ConfigDict, *, d_model: int, num_heads: int,
              layout: str) -> None:
  config.model.d_model = d_model
  config.model.num_heads = num_heads
  config.model.layout = layout


def set_run(config: config_dict.ConfigDict, *, n: int, batch_size: int, steps: int,
            muon_lr: float, warmup_steps: int, eval_every: int, eval_examples: int,
            checkpoint_every: int, log_every: int, adam_lr: float = 5e-5) -> None:
  """The training schedule: passes, batch, steps, learning rates, and the logging cadence."""
  config.n = n
  config.batch_size = batch_size
  config.steps = steps
  config.optim.muon_lr = muon_lr
  config.optim.adam_lr = adam_lr
  config.optim.warmup_steps = warmup_steps
  config.eval_every = eval_every
  config.eval_examples = eval_examples
  config.checkpoint_every = checkpoint_every
  config.log_every = log_every


def smoke(config: config_dict.ConfigDict) -> None:
  """Seconds on a CPU: a two-block model, a handful of steps, frequent eval and checkpoints."""
  set_model(config, d_model=32, num_heads=2, layout="AG")
  set_run(config, n=2, batch_size=8, steps=4, muon_lr=2e-3, warmup_steps=1, eval_every=2,
          eval_examples=16, checkpoint_every=2, log_every=1)
  config.eval_batch_size = 8
  config.keep_checkpoints = 2
