"""The model-level benchmarks: FLOP counts against the matmuls in the traced programs, the timing
helpers, and tiny smoke runs of every script (their JSON must hold consistent rows)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax
from sleep_jax import model as model_lib
from sleep_jax import ops

from benchmarks import attention
from benchmarks import common
from benchmarks import profile
from benchmarks import sleep_cost
from benchmarks import train_step
from benchmarks import wake_latency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- references


def jaxpr_matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs included (scans times their
  length). Written from the dot_general shape rule, independent of the benchmarks' formulas."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)
    assert eqn.primitive.name not in ("while", "cond"), "unexpected control flow"
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          total += repeat * jaxpr_matmul_flops(getattr(sub, "jaxpr", sub))
  return total


def traced_flops(fn, *args) -> int:
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def make_params(**kw):
  """Abstract parameters (shapes only): tracing needs no values, and no compiled init."""
  cfg = sleep_jax.ModelConfig(**dict(dict(vocab_size=13, d_model=16, num_heads=2), **kw))
  return jax.eval_shape(lambda: sleep_jax.init(cfg, jax.random.key(0)))


# ----------------------------------------------------------------------------- FLOP counts


@pytest.mark.parametrize("t,prefix,window", [(7, 0, None), (9, 0, 4), (5, 3, 4), (6, 11, 8)])
def test_attention_pairs_count_an_explicit_mask(t, prefix, window):
  q = prefix + np.arange(t)[:, None]
  k = np.arange(prefix + t)[None, :]
  visible = k <= q
  if window is not None:
    visible &= k > q - window
  assert common.attention_pairs(t, prefix=prefix, window=window) == int(visible.sum())


@pytest.mark.parametrize("layout", ["AA", "a"])
def test_pass_flops_equal_the_matmuls_of_a_forward_pass(layout):
  params = make_params(layout=layout, eviction="none", window=12)
  t = 12
  tokens = jnp.ones((1, t), jnp.int32)

  def forward(weights):
    p = params.replace(weights=weights)
    state = sleep_jax.init_state(p, 1)
    h, _, _ = model_lib.forward_pass(p, model_lib.embed(p, tokens), state, None)
    return model_lib.logits_from_hidden(p, h)

  # The XLA attention path scores every query against every key (t * t pairs).
  expected = common.pass_flops(params.config, t, t * t, logits=True)
  assert traced_flops(forward, params.weights) == sum(expected.values())


def test_pass_flops_of_a_fast_weight_block_are_its_projections_plus_the_op():
  params = make_params(layout="G", eviction="none", window=16, delta_impl="chunked", chunk_size=8)
  cfg = params.config
  t, h, k = 16, cfg.num_heads, cfg.resolved_head_dim
  tokens = jnp.ones((1, t), jnp.int32)

  def forward(weights):
    p = params.replace(weights=weights)
    h_out, _, _ = model_lib.forward_pass(p, model_lib.embed(p, tokens),
                                         sleep_jax.init_state(p, 1), None)
    return h_out

  def op(q, key, v, beta, log_alpha, s):
    return ops.gated_delta_rule(q, key, v, beta, log_alpha, initial_state=s, impl="chunked",
                                chunk_size=8)

  x = jnp.ones((1, t, h, k))
  op_flops = traced_flops(op, x, x, x, jnp.ones((1, t, h)), -jnp.ones((1, t, h)),
                          jnp.zeros((1, h, k, k)))
  parts = common.pass_flops(cfg, t, 0, logits=False)
  assert parts["delta_rule"] > 0
  assert traced_flops(forward, params.weights) - op_flops == (
      parts["projections"] + parts["mlp"])


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_loss_flops_count_passes_per_window_and_logits_on_prediction_windows(eviction):
  params = make_params(layout="Aa", window=8, eviction=eviction)
  layout, n, seq = (True, True, False, True), 3, 32
  batch = {"tokens": jnp.ones((2, seq), jnp.int32), "targets": jnp.ones((2, seq), jnp.int32),
           "loss_mask": jnp.asarray(np.repeat(~np.asarray(layout), 8)[None].repeat(2, 0))}

  def objective(weights):
    return sleep_jax.loss(params.replace(weights=weights), batch, n,
                          consolidation_windows=layout)[0]

  computed = common.loss_flops(params.config, seq, layout, n, computed=True)
  assert traced_flops(objective, params.weights) == 2 * sum(computed.values())
  visible = common.loss_flops(params.config, seq, layout, n)
  assert visible["attention"] < computed["attention"]
  assert {k: v for k, v in visible.items() if k != "attention"} == {
      k: v for k, v in computed.items() if k != "attention"}


def test_peak_flops_from_device_kind():
  assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert common.peak_flops("NVIDIA H200") == 989e12
  assert common.peak_flops("TPU v5 lite") == 197e12
  assert common.peak_flops("TPU v5p") == 459e12
  assert common.peak_flops("TPU v5") == 459e12
  assert common.peak_flops("TPU v6 lite") == 918e12
  assert common.peak_flops("cpu") is None


# ----------------------------------------------------------------------------- helpers


def test_time_calls_rotates_inputs_after_warmup():
  seen = []
  timing = common.time_calls(lambda x: seen.append(x) or jnp.asarray(x), [(0,), (1,), (2,)],
                             runs=4, warmup=2)
  assert seen == [0, 1, 2, 0, 1, 2]
  assert len(timing.times_s) == 4 and timing.min_s <= timing.median_s


def test_time_interleaved_alternates_chains_and_feeds_outputs_back():
  """One call of each chain per round, the order rotating every round (round i starts with
  chain i mod 2 here), each chain's output fed back as its next carry."""
  calls = []

  def stepper(name):
    def step(carry, x):
      calls.append((name, carry, x))
      return carry + x
    return step

  timings = common.time_interleaved([(stepper("a"), 0), (stepper("b"), 100)], [1, 2],
                                    runs=2, warmup=1)
  assert calls == [("a", 0, 1), ("b", 100, 1), ("b", 101, 2), ("a", 1, 2), ("a", 3, 1),
                   ("b", 103, 1)]
  assert [len(t.times_s) for t in timings] == [2, 2]


def test_flag_parsers_name_the_flag():
  assert common.int_list("--x", "1, 2,4", ()) == (1, 2, 4)
  assert common.int_list("--x", None, (3,)) == (3,)
  with pytest.raises(ValueError, match="--windows"):
    common.int_list("--windows", "8,zero", ())
  with pytest.raises(ValueError, match="--passes"):
    common.int_list("--passes", "0", ())
  with pytest.raises(ValueError, match="--impls"):
    common.str_list("--impls", "xla,flash", (), ("xla", "cudnn"))
  with pytest.raises(ValueError, match="--runs"):
    attention.main(["--runs=0"])
  with pytest.raises(ValueError, match="--contexts"):
    wake_latency.main(["--contexts=64,32"])


# ----------------------------------------------------------------------------- smoke runs


def load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_attention_smoke(tmp_path):
  results = attention.main(["--quick", "--seq_lens=16,24", "--window=8", "--heads=2",
                            "--head_dim=8", "--runs=2", "--warmup=1", f"--out_dir={tmp_path}"])
  data = load(tmp_path / "attention_cpu.json")
  assert len(data["rows"]) == 2 * 3 * 2 == len(results.rows)
  for row in data["rows"]:
    pairs = common.attention_pairs(row["T"], window=None if row["mask"] == "causal" else 8)
    assert row["flops"] == 4 * 8 * 2 * 1 * pairs * (3 if row["mode"] == "fwdbwd" else 1)
    assert row["median_ms"] > 0
    assert row["tflops_per_s"] == pytest.approx(row["flops"] / row["median_ms"] / 1e9)
  assert {s["what"] for s in data["summary"]["speedups"]} == {
      "xla: causal / sliding", "xla: sliding_mask / sliding"}


def test_wake_latency_smoke(tmp_path):
  wake_latency.main(["--quick", "--contexts=4,12", "--d_model=16", "--heads=2",
                     "--layout=AG", "--window=8", "--vocab=16", "--variants=donated", "--n=1",
                     "--runs=2", "--warmup=1", f"--out_dir={tmp_path}"])
  data = load(tmp_path / "wake_latency_cpu.json")
  sleep_rows = [r for r in data["rows"] if r["model"] == "sleep"]
  full_rows = [r for r in data["rows"] if r["model"] == "full_attention"]
  assert [r["context"] for r in sleep_rows] == [r["context"] for r in full_rows] == [4, 12]
  for r in sleep_rows:   # really streamed, with a boundary every 8 tokens
    assert (r["tokens_streamed"], r["windows_slept"], r["cache_fill"]) == (
        r["context"], r["context"] // 8, r["context"] % 8)
    assert r["cache_capacity"] == 8
  for r in full_rows:
    assert (r["cache_fill"], r["cache_capacity"]) == (r["context"], r["context"] + 3)
  assert all(r["median_us"] > 0 for r in data["rows"])
  summary = data["summary"]
  assert summary["sleep_latency_12_over_4"] == pytest.approx(
      sleep_rows[1]["median_us"] / sleep_rows[0]["median_us"])
  with open(tmp_path / "wake_latency_cpu.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_wake_latency_summary_adds_the_cast_weights_ratios_where_that_variant_ran():
  """On CPU the bf16_weights variant never runs (float32 compute), so its summary keys are
  checked on made-up rows: the goals come from `donated`, the extra ratios from bf16_weights."""
  times = {("sleep", "donated", 1): 10.0, ("sleep", "donated", 8): 11.0,
           ("full_attention", "donated", 8): 60.0, ("sleep", "bf16_weights", 1): 8.0,
           ("sleep", "bf16_weights", 8): 8.8, ("full_attention", "bf16_weights", 8): 55.0}
  rows = [dict(model=m, variant=v, context=c, median_us=t) for (m, v, c), t in times.items()]
  summary = wake_latency.summarise(rows, [1, 8])
  assert summary["sleep_latency_8_over_1"] == pytest.approx(1.1)
  assert summary["full_attention_over_sleep_at_8"] == pytest.approx(60 / 11)
  assert summary["goal_sleep_5x_faster_than_full_attention_at_8"] is True
  assert summary["bf16_weights_sleep_latency_8_over_1"] == pytest.approx(1.1)
  assert summary["bf16_weights_full_attention_over_sleep_at_8"] == pytest.approx(55 / 8.8)
  donated_only = wake_latency.summarise([r for r in rows if r["variant"] == "donated"], [1, 8])
  assert not any(key.startswith("bf16_weights") for key in donated_only)


def test_wake_latency_rejects_steps_that_overflow_the_window_cache():
  with pytest.raises(ValueError, match="--runs"):
    wake_latency.main(["--quick", "--contexts=7", "--window=8", "--runs=2", "--warmup=1"])


def test_sleep_cost_smoke(tmp_path):
  sleep_cost.main(["--quick", "--windows=8", "--passes=2", "--batch=1", "--d_model=16",
                   "--heads=2", "--layout=AG", "--vocab=16", "--runs=2", "--warmup=1",
                   f"--out_dir={tmp_path}"])
  (row,) = load(tmp_path / "sleep_cost_cpu.json")["rows"]
  assert (row["L"], row["N"]) == (8, 2)
  assert row["sleep_over_n_prefills"] == pytest.approx(row["sleep_ms"] / (2 * row["prefill_ms"]))
  assert row["boundary_over_prefills"] == pytest.approx(row["boundary_ms"] / row["prefill_ms"])
  assert row["boundary_over_passes"] == pytest.approx(row["boundary_ms"] / row["pass_ms"])
  assert row["tokens_per_s"] == pytest.approx(8 / (row["sleep_ms"] / 1e3))


def test_train_step_smoke(tmp_path):
  train_step.main(["--configs=tiny", "--passes=2", "--runs=1", "--warmup=1",
                   "--peak_tflops=1", f"--out_dir={tmp_path}"])
  (row,) = load(tmp_path / "train_step_cpu.json")["rows"]
  preset = train_step.PRESETS["tiny"]
  cfg = sleep_jax.ModelConfig(**preset.config)
  forward = common.loss_flops(cfg, preset.seq_len, preset.consolidation, 2)
  assert row["flops_per_step"] == 3 * preset.quick_batch * sum(forward.values())
  assert row["mfu"] == pytest.approx(row["flops_per_step"] / (row["step_ms"] / 1e3) / 1e12)
  assert row["tokens_per_s"] == pytest.approx(
      preset.quick_batch * preset.seq_len / (row["step_ms"] / 1e3))
  assert math.isfinite(row["loss"])


def test_train_step_times_the_splash_and_unrolled_twins_where_asked(tmp_path):
  """`--splash=tiny` adds an N = 1 row with attention_impl="splash" (the Pallas interpreter on
  the CPU) after the default one, `--unrolled=tiny` one with delta_unroll=UNROLLED; all rows
  run the same step and count the same FLOPs."""
  train_step.main(["--configs=tiny", "--passes=1", "--splash=tiny", "--unrolled=tiny",
                   "--runs=1", "--warmup=1", f"--out_dir={tmp_path}"])
  rows = load(tmp_path / "train_step_cpu.json")["rows"]
  assert [(r["attention"], r["delta_unroll"]) for r in rows] == [
      ("default", 1), ("splash", 1), ("default", train_step.UNROLLED)]
  assert len({r["flops_per_step"] for r in rows}) == 1
  assert all(r["step_ms"] > 0 and math.isfinite(r["loss"]) and "note" not in r for r in rows)
  with pytest.raises(ValueError, match="--splash"):
    train_step.parse_args(["--configs=tiny", "--splash=ca"])


def test_ops_smoke(tmp_path):
  """benchmarks.ops (an absl app, so run as a subprocess) on a tiny shape: the backend's chunk,
  FLOPs from the documented counts, achieved FLOP/s over the given peak, chunked == scan."""
  out = tmp_path / "ops.json"
  subprocess.run([sys.executable, "-m", "benchmarks.ops", "--shapes=1x40x2x16", "--runs=1",
                  "--warmup=0", "--input_sets=1", "--peak_tflops=0.01", f"--out={out}"],
                 cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                 text=True, check=True)
  data = load(out)
  assert data["peak_flops"] == pytest.approx(1e10)
  assert {(r["impl"], r["mode"]) for r in data["rows"]} == {
      (i, m) for i in ("scan", "chunked") for m in ("fwd", "fwdbwd")}
  chunk = ops.default_chunk_size("cpu", 16)
  for row in data["rows"]:
    assert row["chunk_size"] == chunk
    per_token = (6 * 16 * 16 if row["impl"] == "scan"
                 else 6 * 16 * 16 + chunk * (6 * 16 + 4 * 16))
    assert row["flops"] == 40 * 2 * per_token * (3 if row["mode"] == "fwdbwd" else 1)
    assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["median_ms"] / 1e6)
    assert row["fraction_of_peak"] == pytest.approx(row["gflops_per_s"] * 1e9 / 1e10)
    assert row["max_diff"] < 1e-5
  assert {r["ratio"] for r in data["ratios"]} == {"scan/chunked"}


def test_ops_keeps_the_other_rows_when_one_implementation_fails(tmp_path):
  """A kernel its compiler rejects (here the Pallas path at D = 24, not a power of two) becomes
  an error row; the scan and chunked rows of the same shape are still timed."""
  out = tmp_path / "ops.json"
  subprocess.run([sys.executable, "-m", "benchmarks.ops", "--shapes=1x20x2x24", "--runs=1",
                  "--warmup=0", "--input_sets=1", "--modes=fwd", "--impls=scan,pallas,chunked",
                  f"--out={out}"],
                 cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                 text=True, check=True)
  rows = {r["impl"]: r for r in load(out)["rows"]}
  assert "power of two" in rows["pallas"]["error"] and "median_ms" not in rows["pallas"]
  assert rows["scan"]["median_ms"] > 0 and rows["chunked"]["median_ms"] > 0
  assert rows["chunked"]["max_diff"] < 1e-5


def test_ops_unrolled_rows_equal_the_chunked_form(tmp_path):
  """`unrolled` is the chunked form with its chunk loop unrolled (here 2 chunks per iteration
  over 3 chunks): the same outputs, its own row and ratio; a bad --unroll is refused."""
  out = tmp_path / "ops.json"
  subprocess.run([sys.executable, "-m", "benchmarks.ops", "--shapes=1x40x2x16", "--runs=1",
                  "--warmup=0", "--input_sets=1", "--modes=fwd", "--chunk_size=16",
                  "--impls=chunked,unrolled", "--unroll=2", f"--out={out}"],
                 cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                 text=True, check=True)
  data = load(out)
  rows = {r["impl"]: r for r in data["rows"]}
  assert rows["unrolled"]["unroll"] == "2" and rows["unrolled"]["max_diff"] < 1e-6
  assert rows["unrolled"]["flops"] == rows["chunked"]["flops"]
  assert {r["ratio"] for r in data["ratios"]} == {"unrolled/chunked"}
  bad = subprocess.run([sys.executable, "-m", "benchmarks.ops", "--shapes=1x40x2x16",
                        "--impls=unrolled", "--unroll=0", f"--out={out}"],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "--unroll must be an int >= 1 or 'full'" in bad.stderr


@pytest.mark.parametrize("rule", ["gated_delta", "hebbian"])
def test_ops_fla_alone_is_one_row_that_says_why_it_did_not_run(tmp_path, rule):
  """`--impls=fla` compiles nothing of ours; on this CPU (no CUDA) the peer's row is an error
  row naming the reason, and forward+backward asks nothing of fla (it is timed forward only)."""
  out = tmp_path / "ops.json"
  subprocess.run([sys.executable, "-m", "benchmarks.ops", "--shapes=1x20x2x16", "--runs=1",
                  "--modes=fwd,fwdbwd", "--impls=fla", f"--rule={rule}", f"--out={out}"],
                 cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                 text=True, check=True)
  rows = load(out)["rows"]
  assert [(r["impl"], r["mode"]) for r in rows] == [("fla", "fwd")]
  why = rows[0]["error"]
  assert ("gated delta rule only" in why if rule == "hebbian"
          else "not importable" in why or "needs CUDA" in why)


def test_run_gpu_script_plan_and_import_path(tmp_path):
  script = os.path.join(ROOT, "benchmarks", "run_gpu.sh")

  def plan(**env):
    out = subprocess.run(["bash", script, str(tmp_path)],
                         env=dict(os.environ, BENCH_DRY_RUN="1", **env), capture_output=True,
                         text=True, check=True).stdout
    return [l for l in out.splitlines() if ": timeout " in l]

  lines = plan()
  profiles = ["== profile_op_pallas", "== profile_op_chunked", "== profile_wake",
              "== profile_full"]
  assert [l.split(":")[0] for l in lines] == ["== ops", "== ops_fwdbwd", *profiles,
                                              "== wake_latency", "== train_step",
                                              "== sleep_cost", "== attention"]
  assert (f"--out={tmp_path}/ops_gpu.json" in lines[0]
          and "--impls=chunked,unrolled,pallas,fla" in lines[0])
  assert "--unrolled=350m" in lines[7]
  assert f"--out={tmp_path}/ops_gpu_fwdbwd.json" in lines[1]
  assert all(f"--out={tmp_path}/profile_" in l for l in lines[2:6])
  assert all(f"--out_dir={tmp_path}" in l for l in lines[6:])
  # The two runs the script's header recommends: all but the attention tables, at most 6
  # minutes each.
  halves = [plan(BENCH_STEPS="ops,ops_fwdbwd,profile"),
            plan(BENCH_STEPS="wake_latency,train_step,sleep_cost")]
  assert [l.split(":")[0] for l in halves[0] + halves[1]] == [l.split(":")[0]
                                                            for l in lines[:-1]]
  for half in halves:
    assert sum(int(l.split("timeout ")[1].split("s:")[0]) for l in half) <= 360
  failed = subprocess.run(["bash", script, str(tmp_path)],
                          env=dict(os.environ, BENCH_DRY_RUN="1", BENCH_STEPS="ops,train"),
                          capture_output=True, text=True)
  assert failed.returncode == 2 and "unknown step 'train'" in failed.stderr
  # The benchmarks must not pull in the data pipeline (the GPU image has no grain or tfds).
  code = ("import sys, benchmarks.attention, benchmarks.wake_latency, benchmarks.sleep_cost, "
          "benchmarks.train_step, benchmarks.ops, benchmarks.profile; print(sorted(m for m in "
          "sys.modules if m.split('.')[0] in ('grain', 'tensorflow_datasets', 'ml_collections', "
          "'tensorflow')))")
  loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  assert loaded == "[]"


def _trace(*lines):
  """Chrome-trace events: (pid, process, tid, thread, [(ts, dur, name)...]) per line."""
  events = []
  for pid, process, tid, thread, spans in lines:
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}})
    events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                   "args": {"name": thread}})
    events += [{"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}
               for ts, dur, name in spans]
  return events


def test_profile_summary_of_a_gpu_like_trace():
  """Kernel lines are the device's streams (not its derived 'XLA Ops' line, not the host);
  busy time is the union of intervals; counts and times are per call (2 calls here)."""
  events = _trace(
      (1, "/host:CPU", 7, "python", [(0, 100, "PjitFunction(step)")]),
      (2, "/device:GPU:0", 1, "Stream #13(Compute)",
       [(10, 5, "fusion.1"), (20, 5, "fusion.1"), (30, 8, "gemm"), (50, 5, "fusion.1"),
        (60, 5, "fusion.1"), (70, 8, "gemm")]),
      (2, "/device:GPU:0", 2, "Stream #14(MemcpyD2D)", [(32, 10, "MemcpyD2D")]),
      (2, "/device:GPU:0", 3, "XLA Ops", [(10, 70, "fusion.1")]))
  lines = profile.lines_of(events)
  assert profile.kernel_lines(lines) == [("/device:GPU:0", "Stream #13(Compute)"),
                                         ("/device:GPU:0", "Stream #14(MemcpyD2D)")]
  out = profile.summarise(lines, calls=2, top=2)
  compute, copy = out["lines"]
  assert compute["events_per_call"] == 3 and compute["busy_us_per_call"] == (4 * 5 + 2 * 8) / 2
  assert copy["events_per_call"] == 0.5 and copy["busy_us_per_call"] == 5
  assert out["events_per_call"] == 3.5 and out["busy_us_per_call"] == 18 + 5
  assert [r["name"] for r in out["top"]] == ["fusion.1", "gemm"]    # by time: 20 us, then 16
  first = out["top"][0]
  assert first["events_per_call"] == 2 and first["us_per_call"] == 10 and first["mean_us"] == 5
  assert first["share"] == pytest.approx(20 / 46)


def test_profile_cpu_lines_skip_wrappers_and_bookkeeping():
  """Without a device process the XLA client threads are the kernel lines; a loop enclosing
  its body, the executor's wait and end markers are not work; overlapping events count once."""
  events = _trace(
      (1, "/host:CPU", 7, "python", [(0, 500, "PjitFunction(step)")]),
      (1, "/host:CPU", 8, "tf_XLAPjRtCpuClient/1",
       [(0, 100, "ThunkExecutor::Execute (wait for completion)"), (10, 60, "while.3"),
        (12, 20, "dot.1"), (40, 25, "fusion.2"), (65, 0.5, "end: fusion.2"),
        (80, 10, "copy.4"), (85, 10, "copy.5")]))
  lines = profile.lines_of(events)
  assert profile.kernel_lines(lines) == [("/host:CPU", "tf_XLAPjRtCpuClient/1")]
  out = profile.summarise(lines, calls=1, top=10)
  assert sorted(r["name"] for r in out["top"]) == ["copy.4", "copy.5", "dot.1", "fusion.2"]
  assert out["busy_us_per_call"] == 20 + 25 + 15                   # copies overlap by 5 us
  assert profile.busy_us([(0, 10, "a"), (2, 3, "b"), (20, 5, "c")]) == 15


def test_profile_runs_each_target_on_cpu(tmp_path):
  for target in profile.TARGETS:
    out = tmp_path / f"{target}.json"
    profile.main([f"--target={target}", "--runs=2", "--warmup=1", "--top=3", f"--out={out}",
                  "--shape=1x64x2x16", "--d_model=32", "--heads=2", "--window=16",
                  "--context=40"])
    data = load(out)
    summary = data["summary"]
    assert summary["target"] == target and summary["wall_us_per_call"] > 0
    assert summary["events_per_call"] > 0 and summary["busy_us_per_call"] > 0
    assert 1 <= len(data["rows"]) <= 3
    assert all(r["us_per_call"] > 0 and r["events_per_call"] > 0 for r in data["rows"])
