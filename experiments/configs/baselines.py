"""Baselines as config variants: `experiments/configs/<task>.py:<preset>,<variant>`.

    python -m experiments.train --config=experiments/configs/multi_hop.py:small,hybrid_n1 --workdir=DIR
    python -m experiments.train --config=experiments/configs/multi_hop.py:small,full_attention --workdir=DIR
    python -m experiments.train --config=experiments/configs/multi_hop.py:small,transformer_hard --workdir=DIR
    python -m experiments.train --config=experiments/configs/math.py:small,sliding --workdir=DIR
    python -m experiments.train --config=experiments/configs/multi_hop.py:small,compute_matched --workdir=DIR

Variants (each edits a preset's config; any field can still be overridden afterwards):

- `hybrid_n1`: the same hybrid with N = 1, the paper's baseline (the same as `--config.n=1`).
- `full_attention`: every block attention, no eviction: a causal transformer that sees the whole
  sequence, an upper bound the paper never ran.
- `transformer_hard`: every block attention under hard eviction: nothing crosses a window
  boundary, so the answer is at chance by construction (a check of the pipeline).
- `sliding`: the hybrid with sliding-window eviction (the paper's math setting, L = 512).
- `compute_matched`: N = 1 trained for as many more steps as match the training FLOPs of the
  preset's N (`compute_match_n`; see `sleep_jax.train_lib.train_flops_per_example`).
"""

from __future__ import annotations

from ml_collections import config_dict


def _hybrid_n1(config: config_dict.ConfigDict) -> None:
  config.n = 1


def _all_attention(config: config_dict.ConfigDict) -> None:
  config.model.layout = "".join("a" if c.islower() else "A" for c in config.model.layout)
  config.n = 1


def _full_attention(config: config_dict.ConfigDict) -> None:
  _all_attention(config)
  config.model.eviction = "none"


def _transformer_hard(config: config_dict.ConfigDict) -> None:
  _all_attention(config)
  config.model.eviction = "hard"


def _sliding(config: config_dict.ConfigDict) -> None:
  config.model.eviction = "sliding"


def _compute_matched(config: config_dict.ConfigDict) -> None:
  config.compute_match_n = config.n
  config.n = 1


VARIANTS = {
    "hybrid_n1": _hybrid_n1,
    "full_attention": _full_attention,
    "transformer_hard": _transformer_hard,
    "sliding": _sliding,
    "compute_matched": _compute_matched,
}


def apply(config: config_dict.ConfigDict, variant: str) -> None:
  """Edits `config` in place into baseline `variant`."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown baseline variant {variant!r}; valid: {sorted(VARIANTS)}")
  VARIANTS[variant](config)
