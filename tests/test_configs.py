"""Every shipped config: it loads as the command line loads it, validates, traces, and trains.

The fast suite runs two real steps of each task's `smoke` preset and traces (without compiling) a
training step of every other preset and baseline variant at a tiny size; `-m slow` trains two
steps of every one of them.
"""

import math
import os
import tempfile

import jax

CACHE_DIR = os.path.join(tempfile.gettempdir(), "sleep_jax_test_compilation_cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import sleep_jax as sj  # noqa: E402
from experiments import configs  # noqa: E402
from experiments import train as trainer  # noqa: E402
from experiments.configs import baselines, common  # noqa: E402
from sleep_jax import train_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = sorted(configs.TASK_CONFIGS)
ARGS = [f"{preset}{',' + variant if variant else ''}"
        for preset in common.PRESETS for variant in [None, *sorted(baselines.VARIANTS)]]
ALL = [(task, arg) for task in TASKS for arg in ARGS]
# Traced in the fast suite: every task at its paper settings, and every variant once.
TRACED = [(task, "paper") for task in TASKS] + [("multi_hop", f"smoke,{variant}")
                                                 for variant in sorted(baselines.VARIANTS)]


def tiny(config):
  """Shrinks a config to a two-block, width-16 model and a two-step run."""
  config.model.d_model = 16
  config.model.num_heads = 2
  config.model.layout = config.model.layout[:2]
  config.batch_size = 2
  config.eval_batch_size = 2
  config.eval_examples = 2
  config.steps = 2
  config.eval_every = 2
  config.checkpoint_every = 2
  config.log_every = 1
  return config


def parse_command_line(argv):
  """The config as `python -m experiments.train` builds it from `argv`."""
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def test_config_files_load_like_the_command_line_and_accept_overrides():
  path = os.path.join(REPO, "experiments", "configs", "multi_hop.py")
  config = parse_command_line([
      "train", f"--config={path}:small,full_attention", "--config.n=1",
      "--config.task.params.train_hops=(1, 4)", "--config.optim.muon_lr=0.01",
      "--config.grad_passes=1", "--config.model.head_dim=16"])
  assert config.model.eviction == "none" and set(config.model.layout) == {"A"}
  assert config.task.params.train_hops == (1, 4) and config.optim.muon_lr == 0.01
  assert config.grad_passes == 1 and config.model.head_dim == 16
  run = trainer.validate(config)
  assert run.task.train_hops == (1, 4) and run.model.head_dim == 16
  # The config is locked: a misspelt field is an error, not a silent new field.
  with pytest.raises((flags.Error, AttributeError, KeyError), match="num_passes"):
    parse_command_line(["train", f"--config={path}:small", "--config.num_passes=3"])


@pytest.mark.parametrize("task", TASKS)
def test_config_docstrings_hold_the_commands_that_run_them(task):
  module = __import__(f"experiments.configs.{task}", fromlist=["get_config"])
  assert f"python -m experiments.train --config=experiments/configs/{task}.py:" in module.__doc__
  for preset in common.PRESETS:
    assert f"{task}.py:{preset}" in module.__doc__


def test_unknown_presets_and_variants_are_rejected():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    configs.get("multi_hop", "huge")
  with pytest.raises(ValueError, match="unknown variant 'mamba'"):
    configs.get("multi_hop", "small,mamba")
  with pytest.raises(ValueError, match="unknown task"):
    configs.get("chess")


def test_paper_presets_hold_the_papers_settings():
  ca = configs.get("cellular_automaton", "paper")
  assert (ca.model.layout, ca.model.d_model, ca.batch_size) == ("AGAG", 256, 512)
  assert (ca.optim.muon_lr, ca.optim.adam_lr, ca.task.params.t) == (2e-3, 5e-5, 32)
  mh = configs.get("multi_hop", "paper")
  assert (len(mh.model.layout), mh.model.d_model, mh.batch_size) == (10, 512, 128)
  assert (mh.optim.muon_lr, mh.optim.adam_lr) == (2e-3, 5e-5)
  assert mh.task.params.train_hops == (1, 16) and mh.task.params.eval_hops == (1, 2, 4, 8, 16)
  math_cfg = configs.get("math", "paper")
  assert (math_cfg.batch_size, math_cfg.optim.muon_lr, math_cfg.optim.adam_lr) == (256, 1e-3, 5e-5)
  assert trainer.validate(math_cfg).task.window == 2000


def test_baseline_variants():
  hybrid = configs.get("multi_hop", "small")
  assert hybrid.n == 2 and hybrid.model.eviction == "hard" and hybrid.model.layout == "AGAG"
  assert configs.get("multi_hop", "small,hybrid_n1").n == 1
  full = configs.get("multi_hop", "small,full_attention")
  assert (full.model.layout, full.model.eviction, full.n) == ("AAAA", "none", 1)
  hard = configs.get("multi_hop", "small,transformer_hard")
  assert (hard.model.layout, hard.model.eviction, hard.n) == ("AAAA", "hard", 1)
  assert configs.get("math", "small,sliding").model.eviction == "sliding"
  matched = configs.get("multi_hop", "small,compute_matched")
  assert (matched.n, matched.compute_match_n) == (1, hybrid.n)
  run = trainer.validate(matched)
  reference = trainer.validate(hybrid)
  ratio = (train_lib.train_flops_per_example(reference.model, reference.task.consolidation_windows, 2)
           / train_lib.train_flops_per_example(reference.model, reference.task.consolidation_windows, 1))
  assert run.steps == math.ceil(matched.steps * ratio) > matched.steps


def test_flop_accounting_by_hand():
  # One attention block without MLP: d = 4, one head of 4, L = 2, vocab 3, windows (sleep, predict).
  cfg = sj.ModelConfig(vocab_size=3, d_model=4, num_heads=1, layout="a", window=2)
  per_token = 2 * 4 * 4 * 4 + 2 * 2 * 2 * 4   # q, k, v, o projections + scores and values over L = 2
  head = 2 * 4 * 3
  for n in (1, 2, 5):
    forward = n * 2 * per_token + 2 * (per_token + head)
    assert train_lib.train_flops_per_example(cfg, (True, False), n) == 3 * forward
  # Compute matching: N = 1 runs F(4) / F(1) times as many steps.
  f1 = 3 * (2 * per_token + 2 * (per_token + head))
  f4 = 3 * (8 * per_token + 2 * (per_token + head))
  assert train_lib.compute_matched_steps(100, cfg, (True, False), 1, 4) == math.ceil(100 * f4 / f1)
  # Every extra pass costs the same.
  big = sj.ModelConfig(vocab_size=30, d_model=64, num_heads=4, layout="AGAG", window=24)
  flops = [train_lib.train_flops_per_example(big, (True,) * 4 + (False,), n) for n in (1, 2, 3)]
  assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0])


@pytest.mark.parametrize("rule", ["gated_delta", "hebbian"])
def test_fast_weight_flops_by_hand(rule):
  """One fast-weight block without MLP, d = 8, two heads of 4, chunk 4, a 6-token context."""
  cfg = sj.ModelConfig(vocab_size=3, d_model=8, num_heads=2, layout="g", window=6, rule=rule,
                       chunk_size=4)
  projections = 2 * 8 * 2 * 4 * 5 + 2 * 8 * 2 * 2     # qkv, gate, o; beta and alpha gates
  op = (6 * 4 * 4 + 4 * (6 * 4 + 4 * 4) if rule == "gated_delta"   # per head, chunk C = 4
        else 4 * 4 * 4 + 2 * 4 * (4 + 4))
  assert train_lib.forward_flops_per_token(cfg, 6) == projections + 2 * op
  # A context shorter than the chunk runs as one chunk of its own length.
  short = (6 * 4 * 4 + 2 * (6 * 4 + 4 * 4) if rule == "gated_delta"
           else 4 * 4 * 4 + 2 * 2 * (4 + 4))
  assert train_lib.forward_flops_per_token(cfg, 2) == projections + 2 * short


@pytest.mark.parametrize("task, arg", ALL)
def test_every_config_validates(task, arg):
  run = trainer.validate(configs.get(task, arg))
  assert run.steps >= configs.get(task, arg).steps and run.model.window == run.task.window


@pytest.mark.parametrize("task, arg", TRACED)
def test_configs_trace_a_training_step_at_a_tiny_size(task, arg):
  config = tiny(configs.get(task, arg))
  run = trainer.validate(config)
  params = jax.eval_shape(lambda: sj.init(run.model, jax.random.key(0)))
  batch = {"tokens": jax.ShapeDtypeStruct((2, run.task.seq_len), jnp.int32),
           "targets": jax.ShapeDtypeStruct((2, run.task.seq_len), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((2, run.task.seq_len), jnp.bool_)}

  def loss(weights, batch):
    return sj.loss(sj.Params(weights, run.model), batch, config.n,
                   consolidation_windows=run.task.consolidation_windows,
                   grad_passes=config.grad_passes)[0]

  value, grads = jax.eval_shape(jax.value_and_grad(loss), params.weights, batch)
  assert value.shape == () and jax.tree.structure(grads) == jax.tree.structure(params.weights)


@pytest.mark.parametrize("task", TASKS)
def test_smoke_presets_train_two_steps(task, tmp_path):
  config = configs.get(task, "smoke")
  config.steps = 2
  result = trainer.train(config, str(tmp_path))
  assert result["step"] == 2 and np.isfinite(result["loss"])
  group = {"cellular_automaton": "t", "multi_hop": "k", "math": "ops"}[task]
  assert any(k.startswith(f"eval/{group}=") for k in result)


@pytest.mark.slow
@pytest.mark.parametrize("task, arg", ALL)
def test_every_config_trains_two_steps_at_a_tiny_size(task, arg, tmp_path):
  result = trainer.train(tiny(configs.get(task, arg)), str(tmp_path))
  # Two steps, or as many as match their FLOPs for the compute-matched baseline.
  assert result["step"] == result["steps"] >= 2 and np.isfinite(result["loss"])
  groups = [k for k in result if k.startswith("eval/") and k.endswith("/accuracy")]
  assert "eval/all/accuracy" in groups and len(groups) >= 2


@pytest.mark.parametrize("variant, blind", [("transformer_hard", True), ("hybrid_n1", False),
                                            ("full_attention", False)])
def test_hard_eviction_transformer_cannot_see_earlier_windows(variant, blind):
  """The `transformer_hard` baseline is at chance by construction: its predictions in the last
  window are a function of that window alone. Rewriting every earlier window (where the multi-hop
  graph lives) leaves its losses bit for bit unchanged; the hybrid (through the fast-weight state)
  and the full-attention transformer (through the keys) do see the change."""
  run = trainer.validate(tiny(configs.get("multi_hop", f"smoke,{variant}")))
  task = run.task
  params = sj.init(run.model, jax.random.key(0))
  batch = task.examples("test", [0, 1])
  last = task.window * (task.num_windows - 1)  # first token of the prediction window
  other = np.array(batch["tokens"])
  rng = np.random.default_rng(0)
  other[:, :last] = rng.integers(0, len(task.vocab), size=other[:, :last].shape)
  assert (other[:, :last] != batch["tokens"][:, :last]).any()

  def losses(tokens):
    data = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(batch["targets"]),
            "loss_mask": jnp.asarray(batch["loss_mask"])}
    _, nll = sj.score(params, data, 1, consolidation_windows=task.consolidation_windows)
    return np.asarray(nll)[:, last:][np.asarray(batch["loss_mask"])[:, last:]]

  before, after = losses(batch["tokens"]), losses(other)
  assert before.size > 0
  if blind:
    np.testing.assert_array_equal(before, after)
  else:
    assert np.abs(before - after).max() > 1e-4
