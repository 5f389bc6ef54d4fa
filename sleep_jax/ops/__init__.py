"""Recurrent sequence ops: the fast-weight (gated delta / Hebbian) recurrence and its
one-token decode step."""

from sleep_jax.ops.gated_delta import default_chunk_size
from sleep_jax.ops.gated_delta import gated_delta_rule
from sleep_jax.ops.gated_delta import gated_delta_step

__all__ = ["default_chunk_size", "gated_delta_rule", "gated_delta_step"]
