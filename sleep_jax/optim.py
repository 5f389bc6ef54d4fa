"""The optimiser: Muon on the blocks' weight matrices, AdamW on every other parameter.

The paper trains with Muon for matrices and AdamW (lr 5e-5) for "embeddings, output head, norms,
gates and other non-matrix parameters". `param_labels` decides which is which, `scale_by_muon` is
Muon's update direction, and `make_optimizer` assembles the whole chain: global-norm clipping,
then per-group updates; `learning_rate_schedule` is the warm-up + cosine decay of both groups. The choices the paper leaves open are
listed in docs/training.md.

Shape legend: r, c rows and columns of a weight matrix (flax kernels are [fan_in, fan_out]).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

MUON, ADAM = "muon", "adam"

# Newton-Schulz coefficients (a, b, c) of X <- a X + b (X X^T) X + c (X X^T)^2 X.
# "quintic": the tuned coefficients of the original Muon; five steps push every singular value
# into roughly [0.7, 1.2] fast, without converging exactly. "cubic": (3/2, -1/2, 0), the classic
# iteration, which converges to the exact polar factor (slowly for small singular values).
NS_COEFFS = {"quintic": (3.4445, -4.7750, 2.0315), "cubic": (1.5, -0.5, 0.0)}

# Leaves that are 2-D kernels inside a block but are not weight matrices of a linear map between
# feature spaces: the per-head gate projections (d -> heads) and the depthwise conv taps.
_NOT_MUON_MODULES = frozenset({"beta", "alpha", "conv"})


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def label_for(path: tuple, leaf) -> str:
  """MUON for a 2-D `kernel` of a block's linear map, ADAM for everything else."""
  names = [_key_name(p) for p in path]
  in_block = any(n.startswith("block_") for n in names)
  is_matrix = getattr(leaf, "ndim", 0) == 2 and names and names[-1] == "kernel"
  module = names[-2] if len(names) >= 2 else ""
  if in_block and is_matrix and module not in _NOT_MUON_MODULES:
    return MUON
  return ADAM


def param_labels(weights: Any) -> Any:
  """A pytree like `weights` (e.g. `params.weights`) with MUON or ADAM at every leaf.

  Muon: the 2-D kernels of the blocks (attention q/k/v/o, fast-weight qkv/gate/o, MLP
  gate/up/down). AdamW: embedding, output head, every norm scale, the beta/alpha gate kernels,
  `A_log`, `dt_bias` and the short-convolution kernels.
  """
  return jax.tree_util.tree_map_with_path(label_for, weights)


def decay_mask(weights: Any) -> Any:
  """True where weight decay applies: every parameter with two or more axes (not vectors)."""
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, weights)


# ----------------------------------------------------------------------------- Muon


def newton_schulz(g: jax.Array, steps: int = 5, coeffs: str = "quintic",
                  eps: float = 1e-7) -> jax.Array:
  """Approximate polar factor U V^T of g [r c] (g = U S V^T) by a Newton-Schulz iteration.

  g is scaled to unit Frobenius norm first, so every singular value starts in (0, 1]. The
  iteration works on the wide orientation (r <= c) so X X^T is the smaller Gram matrix.
  Computed in float32.
  """
  if g.ndim != 2:
    raise ValueError(f"newton_schulz: expected a matrix [rows, cols], got shape {g.shape}")
  if coeffs not in NS_COEFFS:
    raise ValueError(f"newton_schulz: coeffs must be one of {sorted(NS_COEFFS)}, got {coeffs!r}")
  a, b, c = NS_COEFFS[coeffs]
  x = g.astype(jnp.float32)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = x / (jnp.linalg.norm(x) + eps)

  def step(x, _):
    gram = x @ x.T
    return a * x + (b * gram + c * gram @ gram) @ x, None

  x, _ = jax.lax.scan(step, x, None, length=steps)
  return (x.T if tall else x).astype(g.dtype)


class MuonState(NamedTuple):
  momentum: Any  # like the params


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs: str = "quintic") -> optax.GradientTransformation:
  """Muon's update direction for 2-D parameters (flax kernels [fan_in, fan_out]).

  m <- momentum * m + g; u = g + momentum * m (Nesterov) or m; the update is
  newton_schulz(u) * sqrt(max(1, fan_out / fan_in)). That shape factor is the original Muon's
  sqrt(max(1, rows / cols)) for PyTorch's [out, in] weight layout: it keeps the update's RMS per
  output unit the same for wide and tall matrices. The learning rate is applied later in the chain.
  """
  if ns_coeffs not in NS_COEFFS:
    raise ValueError(f"scale_by_muon: ns_coeffs must be one of {sorted(NS_COEFFS)}, "
                     f"got {ns_coeffs!r}")

  def init_fn(params):
    for leaf in jax.tree.leaves(params):
      if leaf.ndim != 2:
        raise ValueError(f"scale_by_muon: every parameter must be a matrix, got shape "
                         f"{leaf.shape}; route non-matrix parameters to AdamW (param_labels)")
    return MuonState(momentum=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mom = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, updates)
    direction = (jax.tree.map(lambda m, g: g + momentum * m, mom, updates) if nesterov else mom)

    def orthogonalise(u):
      fan_in, fan_out = u.shape
      return newton_schulz(u, ns_steps, ns_coeffs) * max(1.0, fan_out / fan_in) ** 0.5

    return jax.tree.map(orthogonalise, direction), MuonState(momentum=mom)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- the chain


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int,
                           final_fraction: float = 0.1) -> optax.Schedule:
  """Learning rate of update `count` (0-based): host numbers in, host numbers out; jax arrays
  (also traced ones) in, jax arrays out.

  Linear warm-up `peak * (count + 1) / warmup_steps` for the first `warmup_steps` updates (so the
  first update is not wasted at lr 0), then cosine decay from `peak` to `final_fraction * peak` at
  `total_steps`, constant afterwards.
  """
  warmup = max(int(warmup_steps), 0)
  decay = max(int(total_steps) - warmup, 1)

  def schedule(count):
    xp = jnp if isinstance(count, jax.Array) else np
    count = xp.asarray(count, xp.float32)
    warm = peak * xp.minimum(1.0, (count + 1.0) / max(warmup, 1))
    progress = xp.clip((count - warmup) / decay, 0.0, 1.0)
    cosine = peak * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + xp.cos(xp.pi * progress)))
    return xp.where(count < warmup, warm, cosine)

  return schedule


def make_optimizer(*, muon_lr, adam_lr, weight_decay: float = 0.0,
                   clip_norm: Optional[float] = 1.0, muon_momentum: float = 0.95,
                   ns_steps: int = 5, adam_b1: float = 0.9, adam_b2: float = 0.95,
                   adam_eps: float = 1e-8) -> optax.GradientTransformation:
  """Clip the global gradient norm, then Muon on block matrices and AdamW on the rest.

  `muon_lr` and `adam_lr` are numbers, scalar arrays (the trainer passes this step's values as
  arguments of its jitted step, so the compiled step does not depend on the schedule) or
  `optax.Schedule`s. Weight decay is decoupled and multiplied by the learning rate (as in AdamW /
  PyTorch) and applies to parameters with two or more axes. `clip_norm` None or 0: no clipping.
  The optimiser state's structure does not depend on the learning rates.
  """
  for name, value in (("muon_lr", muon_lr), ("adam_lr", adam_lr)):
    if isinstance(value, (int, float)) and not value > 0:
      raise ValueError(f"make_optimizer: {name} must be > 0, got {value!r}")
  if not weight_decay >= 0:
    raise ValueError(f"make_optimizer: weight_decay must be >= 0, got {weight_decay!r}")
  muon = optax.chain(
      scale_by_muon(muon_momentum, ns_steps=ns_steps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(muon_lr),
  )
  adam = optax.adamw(adam_lr, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                     weight_decay=weight_decay, mask=decay_mask)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.multi_transform({MUON: muon, ADAM: adam}, param_labels))
  return optax.chain(*parts)
