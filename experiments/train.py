r"""Trains a sleep model on one task (the paper's Algorithm 1), with eval, checkpoints and logs.

    python -m experiments.train --config=experiments/configs/multi_hop.py:small --workdir=runs/mh
    python -m experiments.train --config=experiments/configs/multi_hop.py:small \
        --config.n=4 --config.steps=2000 --workdir=runs/mh_n4

In Python: `train(config, workdir) -> dict` with the final metrics (see `train`).

The workdir receives `metrics.jsonl` (one JSON object per logged step), TensorBoard events,
`config.json` and `checkpoints/`. Rerunning with the same workdir resumes from the latest
checkpoint (same batches, same result). SIGTERM saves a checkpoint and exits with status 143; a
non-finite loss or gradient saves the last good state and stops with an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import math
import re
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict
from ml_collections import config_flags

import sleep_jax
from sleep_jax import checkpointing
from sleep_jax import data
from sleep_jax import optim
from sleep_jax import sharding
from sleep_jax import tasks
from sleep_jax import train_lib
from sleep_jax.tasks.base import Task

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "stopped, not finished; rerun to resume"

# Progress goes to this logger at INFO (on by default on the command line; in-process callers
# choose with `logging.getLogger("experiments.train").setLevel(...)`). Orbax and Grain log through
# absl, which the command line keeps at WARNING unless --verbosity is given.
log = std_logging.getLogger("experiments.train")


class ConfigError(ValueError):
  """A config value is invalid; the message names the flag (`--config.<field>`)."""


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN or infinite; the last good state was saved."""


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class Run:
  """The validated, resolved settings of a run."""

  task: Task
  model: sleep_jax.ModelConfig
  steps: int              # updates to run (after compute matching)
  data_seed: int
  eval_batch_size: int
  eval_examples: int


def _flag_error(name: str, message: str) -> ConfigError:
  return ConfigError(f"--config.{name}: {message}")


def _check_int(config, name: str, low: int, high: Optional[int] = None, *,
               allow_none: bool = False) -> None:
  value = config
  for part in name.split("."):
    value = value[part]
  if value is None and allow_none:
    return
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  ok = ok and value >= low and (high is None or value <= high)
  if not ok:
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    extra = " or None" if allow_none else ""
    raise _flag_error(name, f"must be an integer {bound}{extra}, got {value!r}")


def _check_float(config, name: str, *, positive: bool) -> None:
  value = config.optim[name.split(".")[-1]]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > 0 if positive else value >= 0)
  if not ok:
    raise _flag_error(name, f"must be a finite number {'> 0' if positive else '>= 0'}, "
                      f"got {value!r}")


def validate(config: config_dict.ConfigDict) -> Run:
  """Checks every field once, before anything is compiled; raises ConfigError naming the flag."""
  for field in ("task", "model", "n", "seed", "batch_size", "steps", "optim", "mesh"):
    if field not in config:
      raise _flag_error(field, "missing from the config; start from experiments/configs/common.py")
  name = config.task.name
  if name not in tasks.names():
    raise _flag_error("task.name", f"unknown task {name!r}; valid: {tasks.names()}")
  params = {k: (tuple(v) if isinstance(v, list) else v)
            for k, v in config.task.params.to_dict().items() if v is not None}
  try:
    task = tasks.get(name, **params)
  except ValueError as error:
    message = str(error)
    quoted = re.search(r"parameter '(\w+)'", message)
    field = f"task.params.{quoted.group(1)}" if quoted else "task.params"
    if field != "task.params.window" and "window" in message:
      message += " (or change --config.task.params.window)"
    raise _flag_error(field, message) from None

  _check_int(config, "n", 1, 1024)
  _check_int(config, "grad_passes", 1, config.n, allow_none=True)
  _check_int(config, "seed", 0)
  _check_int(config, "data_seed", 0, allow_none=True)
  _check_int(config, "batch_size", 1)
  _check_int(config, "steps", 0)
  _check_int(config, "compute_match_n", 1, 1024, allow_none=True)
  _check_int(config, "log_every", 1)
  _check_int(config, "eval_every", 0)
  _check_int(config, "checkpoint_every", 1)
  _check_int(config, "keep_checkpoints", 1)
  _check_int(config, "eval_examples", 1, task.split_size("test"))
  _check_int(config, "eval_batch_size", 1, allow_none=True)
  _check_int(config, "data_workers", 0, 1024)
  _check_int(config, "optim.warmup_steps", 0)
  _check_int(config, "optim.ns_steps", 1, 100)
  for field in ("muon_lr", "adam_lr"):
    _check_float(config, f"optim.{field}", positive=True)
  for field in ("weight_decay", "clip_norm", "final_lr_fraction", "muon_momentum", "adam_b1",
                "adam_b2"):
    _check_float(config, f"optim.{field}", positive=False)

  model_fields = dict(config.model.to_dict())
  for reserved in ("vocab_size", "window"):
    if reserved in model_fields:
      raise _flag_error(f"model.{reserved}", "comes from the task; set --config.task.params."
                        "window for the window length")
  try:
    model = sleep_jax.ModelConfig(vocab_size=len(task.vocab), window=task.window, **model_fields)
  except ValueError as error:
    message = str(error)
    if message.startswith("ModelConfig."):
      field, _, rest = message[len("ModelConfig."):].partition(":")
      raise _flag_error(f"model.{field}", rest.strip()) from None
    raise ConfigError(f"--config.model: {message}") from None
  except TypeError as error:
    raise ConfigError(f"--config.model: {error}") from None

  if model.eviction == "none" and config.n != 1:
    raise _flag_error("n", f"must be 1 with --config.model.eviction='none' (no window boundary "
                      f"to sleep at), got {config.n}")
  if task.window > task.seq_len:
    raise _flag_error("task.params.window", f"window {task.window} is longer than the sequence "
                      f"({task.seq_len} tokens)")
  steps = config.steps
  if config.compute_match_n is not None:
    steps = train_lib.compute_matched_steps(config.steps, model, task.consolidation_windows,
                                            config.n, config.compute_match_n)
  eval_batch_size = config.eval_batch_size or config.batch_size
  return Run(task=task, model=model, steps=steps,
             data_seed=config.seed if config.data_seed is None else config.data_seed,
             eval_batch_size=eval_batch_size, eval_examples=config.eval_examples)


# Fields that define what a checkpoint holds: a workdir cannot resume with other values.
_RUN_IDENTITY = ("task", "model", "n", "seed", "data_seed")
# Model fields that choose how the same model is computed (kernels, chunking, recomputation),
# not what it is: a run may resume with other values, e.g. on another backend.
_HOW_COMPUTED = ("chunk_size", "delta_impl", "attention_impl", "remat", "scan_layers",
                 "delta_unroll")


def _check_same_run(config: config_dict.ConfigDict, workdir: epath.Path) -> None:
  """Refuses to resume a workdir whose checkpoints belong to another task, model, N or seed."""
  saved_path = workdir / "config.json"
  if not (saved_path.exists() and (workdir / "checkpoints").exists()):
    return
  saved = json.loads(saved_path.read_text())
  current = json.loads(config.to_json_best_effort())
  changed = []
  for field in _RUN_IDENTITY:
    old, new = saved.get(field), current.get(field)
    if isinstance(old, dict) and isinstance(new, dict):
      exempt = _HOW_COMPUTED if field == "model" else ()
      changed += [f"{field}.{k}" for k in sorted(set(old) | set(new))
                  if old.get(k) != new.get(k) and k not in exempt]
    elif old != new:
      changed.append(field)
  if changed:
    raise ConfigError(
        f"--workdir {workdir} holds checkpoints of a run with other values of "
        f"{', '.join('--config.' + c for c in changed)}; use a new --workdir (or delete that one) "
        "to train this config")


# ----------------------------------------------------------------------------- training


def train(config: config_dict.ConfigDict, workdir: str, *,
          stop_at_step: Optional[int] = None) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir`.

  `stop_at_step` stops early after that step as a SIGTERM would (checkpoint, `preempted` True),
  without changing the run: rerunning resumes it (e.g. to split a run across time-limited jobs).

  Returns the final metrics: `step`, `steps` (total), the last logged training metrics (`loss`,
  `accuracy`, `exact`, `grad_norm`, ...), the last evaluation (`eval/<group>/<metric>`, e.g.
  `eval/k=4/accuracy`, and `eval/all/...`), and `preempted` (True when SIGTERM stopped the run
  early; rerun to resume). Raises ConfigError for a bad config, NonFiniteError when the loss or
  gradients become non-finite.
  """
  run = validate(config)
  task, model_config = run.task, run.model
  if config.compilation_cache_dir:
    # Takes effect when set before this process compiles anything (the command line does).
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  workdir = epath.Path(workdir)
  _check_same_run(config, workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---- mesh: all local devices; data parallel unless config.mesh says otherwise.
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    sharding.check_divisibility(mesh, config.batch_size, model_config)
  except ValueError as error:
    raise ConfigError(f"--config.mesh / --config.batch_size / --config.model: {error}") from None
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if run.eval_batch_size % batch_shards:
    raise _flag_error("eval_batch_size", f"must be a multiple of config.mesh.data * "
                      f"config.mesh.fsdp = {batch_shards}, got {run.eval_batch_size}")
  if config.batch_size % jax.process_count():
    raise _flag_error("batch_size", f"must be a multiple of the process count "
                      f"{jax.process_count()}, got {config.batch_size}")
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())

  # ---- data: this process's rows of every global batch, from a checkpointable Grain iterator.
  train_iter = data.make_train_iterator(task, config.batch_size, run.data_seed,
                                        worker_count=config.data_workers)

  # ---- model and optimiser
  # The learning rates are arguments of the compiled step (computed here, on the host, every step),
  # so the step does not depend on them nor on the run length: runs that differ only in those
  # share one compiled program (and JAX's persistent compilation cache).
  muon_schedule = optim.learning_rate_schedule(config.optim.muon_lr, run.steps,
                                               config.optim.warmup_steps,
                                               config.optim.final_lr_fraction)
  adam_schedule = optim.learning_rate_schedule(config.optim.adam_lr, run.steps,
                                               config.optim.warmup_steps,
                                               config.optim.final_lr_fraction)

  def make_optimizer(muon_lr, adam_lr) -> optax.GradientTransformation:
    return optim.make_optimizer(
        muon_lr=muon_lr, adam_lr=adam_lr, weight_decay=config.optim.weight_decay,
        clip_norm=config.optim.clip_norm, muon_momentum=config.optim.muon_momentum,
        ns_steps=config.optim.ns_steps, adam_b1=config.optim.adam_b1,
        adam_b2=config.optim.adam_b2)

  rng = jax.random.key(config.seed)

  def init_state(rng) -> train_lib.TrainState:
    weights = sleep_jax.init(model_config, rng).weights
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=weights,
                                opt_state=make_optimizer(1.0, 1.0).init(weights),
                                rng=jax.random.key_data(rng))

  abstract_state = jax.eval_shape(init_state, rng)
  state_sharding = sharding.param_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      state_sharding)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  flops_per_example = train_lib.train_flops_per_example(
      model_config, task.consolidation_windows, config.n, task.seq_len)

  # ---- restore: the latest readable checkpoint, else a fresh initialisation.
  checkpointer = checkpointing.Checkpointer(
      workdir / "checkpoints", save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(abstract_state, train_iter)
  if restored is None:
    state = jax.jit(init_state, out_shardings=state_sharding)(rng)
    start_step = 0
  else:
    state, start_step = restored
    log.info("resumed from the checkpoint at step %d in %s", start_step, workdir)
  log.info("%s: %s, %s parameters, n=%d, %d steps of %d examples (T=%d, L=%d), mesh %s, "
           "%.3g training FLOPs per example", task.name, model_config.layout,
           f"{num_params:,}", config.n, run.steps, config.batch_size, task.seq_len, task.window,
           dict(mesh.shape), flops_per_example)

  # ---- step: one update; a non-finite loss, gradient or update leaves the state unchanged.
  n, grad_passes = config.n, config.grad_passes
  consolidation_windows = task.consolidation_windows

  def loss_fn(weights, batch):
    params = sleep_jax.Params(weights=weights, config=model_config)
    return sleep_jax.loss(params, batch, n, consolidation_windows=consolidation_windows,
                          grad_passes=grad_passes)

  def train_step(state: train_lib.TrainState, batch: dict, step: jax.Array,
                 learning_rates: jax.Array):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    grad_norm = optax.tree.norm(grads)
    tx = make_optimizer(learning_rates[0], learning_rates[1])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    weights = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(w)) for w in jax.tree.leaves(weights)]))
    # `state.step == step` makes a failure sticky: once an update is refused, the state's step
    # lags the loop's and every later update is refused too, so the host (which checks only at
    # log, eval and checkpoint steps) finds the last good state intact.
    ok = finite & (state.step == step)
    new_state = train_lib.TrainState(step=state.step + 1, params=weights, opt_state=opt_state,
                                     rng=state.rng)
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    metrics = {"loss": loss, "accuracy": metrics["accuracy"], "exact": metrics["exact"],
               "grad_norm": grad_norm}
    return state, metrics

  abstract_batch = {
      "tokens": jax.ShapeDtypeStruct((config.batch_size, task.seq_len), jnp.int32,
                                     sharding=batch_sharding),
      "targets": jax.ShapeDtypeStruct((config.batch_size, task.seq_len), jnp.int32,
                                      sharding=batch_sharding),
      "loss_mask": jax.ShapeDtypeStruct((config.batch_size, task.seq_len), jnp.bool_,
                                        sharding=batch_sharding),
  }
  compile_start = time.perf_counter()
  # Traced with the mesh in context: kernels that XLA cannot partition (splash attention) then
  # run per device under `shard_map` (`sleep_jax.attention.splash_attention`).
  with jax.set_mesh(mesh):
    step_fn = jax.jit(
        train_step, in_shardings=(state_sharding, batch_sharding, replicated, replicated),
        out_shardings=(state_sharding, replicated), donate_argnums=0,
    ).lower(abstract_state, abstract_batch,
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated)).compile()
  log.info("compiled the train step in %.1f s", time.perf_counter() - compile_start)

  @jax.jit
  def score(weights, tokens, targets, loss_mask):
    params = sleep_jax.Params(weights=weights, config=model_config)
    batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
    predictions, token_loss = sleep_jax.score(params, batch, n,
                                              consolidation_windows=consolidation_windows)
    return (jax.lax.with_sharding_constraint(predictions, replicated),
            jax.lax.with_sharding_constraint(token_loss, replicated))

  def evaluate(weights) -> dict:
    def score_fn(tokens, targets, loss_mask):
      # Every process holds the whole eval batch; each device takes its rows from it.
      arrays = [jax.make_array_from_callback(x.shape, batch_sharding, lambda i, x=x: x[i])
                for x in (tokens, targets, loss_mask)]
      with jax.set_mesh(mesh):  # traced on the first call: as for the train step
        predictions, token_loss = score(weights, *arrays)
      return np.asarray(predictions), np.asarray(token_loss)

    results = task.evaluate(score_fn, num_examples=run.eval_examples,
                            batch_size=run.eval_batch_size, data_dir=config.data_dir)
    return train_lib.flatten_eval(results)

  # ---- loop: step; at log / eval / checkpoint steps, check health, then log, evaluate, save.
  metrics_log = train_lib.MetricsLog(workdir, resume_step=start_step)
  final: dict[str, Any] = {}
  for record in metrics_log.records:
    final.update(record)
  tokens_per_step = config.batch_size * task.seq_len
  pending: list[dict] = []        # per-step device metrics since the last check
  positions: dict[int, Any] = {}  # data position before each step since the last check
  window_start, window_step, paused = time.perf_counter(), start_step, 0.0
  step, preempted = start_step, False
  with checkpointing.PreemptionGuard() as guard:
    while step < run.steps:
      positions[step] = train_iter.get_state()
      batch = sharding.global_batch(next(train_iter), mesh)
      learning_rates = np.array([muon_schedule(step), adam_schedule(step)], np.float32)
      state, metrics = step_fn(state, batch, np.asarray(step, np.int32), learning_rates)
      pending.append(metrics)
      step += 1
      signalled = guard.reached(step)
      preempted = signalled or step == stop_at_step
      last = step == run.steps or preempted
      do_log = step % config.log_every == 0 or last
      # After SIGTERM, save at once (the notice may be short); periodic evaluation can wait.
      do_eval = step == run.steps or (
          not signalled and config.eval_every and step % config.eval_every == 0)
      do_save = checkpointer.should_save(step) or last
      if not (do_log or do_eval or do_save):
        continue

      values = jax.device_get(pending)
      good_step = int(state.step)
      if good_step != step:
        _stop_non_finite(values, good_step, step - len(pending), state, positions[good_step],
                         checkpointer, metrics_log, workdir)
      record: dict[str, Any] = {"step": step}
      if do_log:
        elapsed = time.perf_counter() - window_start - paused
        steps_per_sec = (step - window_step) / max(elapsed, 1e-9)
        record.update({key: float(np.mean([v[key] for v in values]))
                       for key in ("loss", "accuracy", "exact", "grad_norm")})
        record["lr/muon"], record["lr/adam"] = (float(lr) for lr in learning_rates)
        record["perf/steps_per_sec"] = steps_per_sec
        record["perf/tokens_per_sec"] = steps_per_sec * tokens_per_step
        record["perf/flops_per_sec"] = steps_per_sec * flops_per_example * config.batch_size
        log.info(
            "step %d/%d | loss %.4f acc %.3f exact %.3f | %.2f steps/s %s tok/s | ETA %s",
            step, run.steps, record["loss"], record["accuracy"], record["exact"], steps_per_sec,
            f"{record['perf/tokens_per_sec']:,.0f}",
            train_lib.format_duration((run.steps - step) / max(steps_per_sec, 1e-9)))
        window_start, window_step, paused = time.perf_counter(), step, 0.0
      pause_start = time.perf_counter()
      if do_eval:
        eval_metrics = evaluate(state.params)
        record.update(eval_metrics)
        log.info("eval at step %d: %s", step, " ".join(
            f"{k[len('eval/'):]}={v:.3f}" for k, v in eval_metrics.items()
            if k.endswith("/accuracy")))
      if do_save:
        checkpointer.save(step, state, train_iter.get_state(), force=last)
      if len(record) > 1:
        metrics_log.write(record)
        metrics_log.flush()
        final.update(record)
      paused += time.perf_counter() - pause_start
      pending, positions = [], {}
      if preempted:
        log.warning("stopped early: saved a checkpoint at step %d in %s; rerun with the same "
                    "--workdir to resume", step, workdir)
        break

  checkpointer.close()
  metrics_log.close()
  final.update({"step": step, "steps": run.steps, "preempted": preempted})
  return final


def _stop_non_finite(values, good_step, first_pending_step, state, position, checkpointer,
                     metrics_log, workdir) -> None:
  """Saves the last good state (the state stopped updating at `good_step`) and raises."""
  bad = values[good_step - first_pending_step]
  checkpointer.save(good_step, state, position, force=True)
  checkpointer.close()
  metrics_log.write({"step": good_step + 1, "loss": float(bad["loss"]),
                     "grad_norm": float(bad["grad_norm"]), "non_finite": True})
  metrics_log.close()
  raise NonFiniteError(
      f"non-finite loss, gradient or update at step {good_step + 1} (loss {bad['loss']}, "
      f"gradient norm {bad['grad_norm']}); saved the last good state (step {good_step}) in "
      f"{workdir}/checkpoints. Lower --config.optim.muon_lr / --config.optim.adam_lr, or "
      "lengthen --config.optim.warmup_steps, then rerun to resume from it.")


# ----------------------------------------------------------------------------- entry point

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file, e.g. experiments/configs/multi_hop.py:small",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (local path or gs:// URL); "
                               "rerunning with the same one resumes")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sharding.maybe_initialize_distributed()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # absl's INFO is Orbax's per-save chatter
  log.setLevel(std_logging.INFO)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. "
                         "--config=experiments/configs/multi_hop.py:small")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    result = train(_CONFIG.value, _WORKDIR.value)
  except ConfigError as error:
    print(f"experiments.train: error: {error}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteError as error:
    print(f"experiments.train: error: {error}", file=sys.stderr)
    sys.exit(1)
  if result["preempted"]:
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
