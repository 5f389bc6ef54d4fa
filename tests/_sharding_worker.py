"""Sharded-versus-single-device checks on 8 fake CPU devices; run by tests/test_sharding.py.

It must run in its own process: the device count is fixed when JAX starts, from
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, which it sets before importing JAX. It prints
one JSON object with the measured differences and sharding facts; the test asserts on them.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import sleep_jax  # noqa: E402
from sleep_jax import sharding  # noqa: E402

MESHES = {"data": (8, 1, 1), "fsdp": (2, 4, 1), "tensor": (2, 2, 2)}
VOCAB, L, B, N = 11, 8, 8, 2
LAYOUT = (True, True, False)  # two consolidation windows, then one prediction window
# The per-token scan op compiles faster than the chunked one; both are batched over b and h alike,
# so the sharding behaviour under test is the same.
CONFIG = sleep_jax.ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=4, layout="AG", window=L,
                               mlp_dim=64, delta_impl="scan")


def rel_err(a, b) -> float:
  """Largest |a - b| over a pytree, relative to the largest |b| of the same leaf (floor 1)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    worst = max(worst, float(np.max(np.abs(x - y)) / max(1e-3, float(np.max(np.abs(y))))))
  return worst


def same_shardings(values, shardings) -> bool:
  pairs = zip(jax.tree.leaves(values), jax.tree.leaves(shardings), strict=True)
  return all(v.sharding.is_equivalent_to(s, v.ndim) for v, s in pairs)


def make_batch(rng: np.random.Generator) -> dict:
  tokens = rng.integers(0, VOCAB, (B, L * len(LAYOUT)), dtype=np.int32)
  targets = rng.integers(0, VOCAB, tokens.shape, dtype=np.int32)
  mask = np.zeros(tokens.shape, bool)
  mask[:, -L + 2:] = True  # supervised tokens in the prediction window only
  return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def loss_fn(params, batch):
  return sleep_jax.loss(params, batch, N, consolidation_windows=LAYOUT)


def main() -> dict:
  out = {"devices": jax.device_count(), "meshes": {}}
  rng = np.random.default_rng(0)
  batch = make_batch(rng)
  key = jax.random.key(0)

  # Single-device reference: everything on device 0.
  params = sleep_jax.init(CONFIG, key)
  grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (ref_loss, ref_metrics), ref_grads = grad_step(params, batch)
  ctx = jnp.asarray(batch["tokens"][:, :L])
  state0 = jax.tree.map(lambda s: s + 0.1 * jax.random.normal(jax.random.key(1), s.shape),
                        sleep_jax.init_state(params, B))
  ref_slept = sleep_jax.sleep(params, state0, ctx, N)
  cache0 = sleep_jax.init_cache(params, B)
  ref_logits, ref_woke, ref_cache = sleep_jax.wake(params, ref_slept, cache0, ctx[:, :5])

  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(*shape)
    res = {"mesh_shape": dict(mesh.shape)}
    p_sh = sharding.param_shardings(params, mesh)
    if name == "tensor":  # one compile of the sharded initialiser is enough
      sparams = sharding.init_sharded(CONFIG, key, mesh)
      res["init_sharded_err"] = rel_err(sparams, params)
      res["init_sharded_as_requested"] = same_shardings(sparams, p_sh)
    else:
      sparams = jax.device_put(params, p_sh)
    mlp = sparams.weights["block_0"]["mlp"]["up"]["kernel"]
    res["mlp_up_shard_shape"] = list(mlp.addressable_shards[0].data.shape)
    res["mlp_up_shape"] = list(mlp.shape)
    # vocab=11 is not divisible by tensor=2: that dimension must fall back to replicated.
    res["head_kernel_spec"] = str(p_sh.weights["head"]["kernel"].spec)
    res["embedding_spec"] = str(p_sh.weights["embedding"]["embedding"].spec)

    sbatch = sharding.global_batch(batch, mesh)
    b_sh = sharding.batch_sharding(mesh)
    res["batch_sharded_as_requested"] = all(
        x.sharding.is_equivalent_to(b_sh, 2) for x in sbatch.values())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                   in_shardings=(p_sh, {k: b_sh for k in sbatch}),
                   out_shardings=((replicated, replicated), p_sh))
    (loss, metrics), grads = step(sparams, sbatch)
    res["loss_err"] = rel_err(loss, ref_loss)
    res["metrics_err"] = rel_err(metrics, ref_metrics)
    res["grad_err"] = rel_err(grads, ref_grads)
    res["grad_norm"] = float(optax.global_norm(ref_grads))

    # Sleep and wake through the public (internally jitted) functions, inputs sharded: the output
    # state must come back with the sharding it went in with (the scan carry keeps one sharding).
    s_sh = sharding.state_shardings(state0, mesh)
    sstate = jax.device_put(state0, s_sh)
    sctx = jax.device_put(ctx, b_sh)
    slept = sleep_jax.sleep(sparams, sstate, sctx, N)
    res["sleep_err"] = rel_err(slept, ref_slept)
    res["sleep_state_keeps_sharding"] = same_shardings(slept, s_sh)
    res["sleep_state_spec"] = str(jax.tree.leaves(slept)[0].sharding.spec)
    c_sh = sharding.cache_shardings(cache0, mesh)
    scache = jax.device_put(cache0, c_sh)
    logits, woke, cache = sleep_jax.wake(sparams, slept, scache, jax.device_put(ctx[:, :5], b_sh))
    res["wake_logits_err"] = rel_err(logits, ref_logits)
    res["wake_state_err"] = rel_err(woke, ref_woke)
    res["wake_cache_err"] = rel_err(cache, ref_cache)
    res["wake_state_keeps_sharding"] = same_shardings(woke, s_sh)
    # The conv tails' layout is left to the compiler; the K/V must stay split over batch and heads.
    res["wake_kv_keeps_sharding"] = all(
        same_shardings(layer, want) for layer, want in zip(cache.layers, c_sh.layers) if "k" in layer)
    out["meshes"][name] = res

  out["scan_layers"] = scanned_blocks(batch)
  out["splash"] = splash_under_mesh(batch)
  out["checkpoint"] = checkpoint_across_meshes(params)
  out["errors"] = error_messages()
  return out


def sharded_grad_step(params, batch, mesh):
  """The jitted value and gradient of the loss with the model's shardings on `mesh`, and the
  parameters and batch placed accordingly: (step, params, batch)."""
  p_sh = sharding.param_shardings(params, mesh)
  b_sh = sharding.batch_sharding(mesh)
  sbatch = sharding.global_batch(batch, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                 in_shardings=(p_sh, {k: b_sh for k in sbatch}),
                 out_shardings=((replicated, replicated), p_sh))
  return step, jax.device_put(params, p_sh), sbatch


def scanned_blocks(batch) -> dict:
  """`scan_layers=True` (weights stacked inside the pass) under the (2, 2, 2) mesh, against the
  unrolled blocks on one device."""
  cfg = CONFIG.replace(layout="AGAG", scan_layers=True)
  params = sleep_jax.init(cfg, jax.random.key(2))
  grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (ref_loss, _), ref_grads = grad_step(params.replace(config=cfg.replace(scan_layers=False)),
                                       batch)
  mesh = sharding.make_mesh(*MESHES["tensor"])
  step, sparams, sbatch = sharded_grad_step(params, batch, mesh)
  (loss, _), grads = step(sparams, sbatch)
  return {"loss_err": rel_err(loss, ref_loss), "grad_err": rel_err(grads, ref_grads),
          "grad_norm": float(optax.global_norm(ref_grads))}


def splash_under_mesh(batch) -> dict:
  """`attention_impl="splash"` under the (2, 2, 2) mesh set with `jax.set_mesh` (the kernel runs
  per device inside `shard_map`: 4 of the 8 rows and 2 of the 4 heads each), against the XLA
  path on one device."""
  cfg = CONFIG.replace(attention_impl="splash")
  params = sleep_jax.init(cfg, jax.random.key(3))
  (ref_loss, _), ref_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params.replace(config=CONFIG), batch)
  mesh = sharding.make_mesh(*MESHES["tensor"])
  step, sparams, sbatch = sharded_grad_step(params, batch, mesh)
  with jax.set_mesh(mesh):
    lowered = step.lower(sparams, sbatch).as_text()
    (loss, _), grads = step(sparams, sbatch)
  return {"loss_err": rel_err(loss, ref_loss), "grad_err": rel_err(grads, ref_grads),
          "grad_norm": float(optax.global_norm(ref_grads)),
          # shard_map lowers to a manual computation (Shardy) or a shmap_body call (GSPMD).
          "per_device": "manual_computation" in lowered or "shmap_body" in lowered}


def checkpoint_across_meshes(params) -> dict:
  """Saves params and AdamW state under the FSDP mesh, restores them under the tensor mesh."""
  save_mesh = sharding.make_mesh(*MESHES["fsdp"])
  load_mesh = sharding.make_mesh(*MESHES["tensor"])
  opt = optax.adamw(1e-3)
  tree = {"params": params, "opt_state": opt.init(params)}
  # Move the moments away from zero so that a restore that silently zeroes them would show.
  tree = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  saved = jax.device_put(tree, sharding.param_shardings(tree, save_mesh))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding.param_shardings(tree, load_mesh))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt")
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, saved)
      ckptr.wait_until_finished()
      restored = ckptr.restore(path, target)
  shardings = sharding.param_shardings(tree, load_mesh)
  kernel = restored["opt_state"][0].mu.weights["block_1"]["fast_weight"]["o"]["kernel"]
  return {
      "err": rel_err(restored, tree),
      "same_structure": jax.tree.structure(restored) == jax.tree.structure(tree),
      "restored_as_requested": same_shardings(restored, shardings),
      "adam_mu_fast_weight_o_spec": str(kernel.sharding.spec),
  }


def error_messages() -> dict:
  msgs = {}
  try:
    sharding.make_mesh(3, 1, 1)
  except ValueError as e:
    msgs["make_mesh"] = str(e)
  mesh = sharding.make_mesh(2, 2, 2)
  bad = CONFIG.replace(num_heads=3, head_dim=8, d_model=30)
  try:
    sharding.check_divisibility(mesh, 6, bad)
  except ValueError as e:
    msgs["check_divisibility"] = str(e)
  sharding.check_divisibility(mesh, 8, CONFIG)  # must pass
  return msgs


if __name__ == "__main__":
  json.dump(main(), sys.stdout)
