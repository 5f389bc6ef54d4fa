"""The static model configuration: a frozen, validated dataclass.

Everything about a model that is fixed at trace time lives here. `init` stores the config in the
static (non-array) part of the parameter pytree, so `sleep`, `wake` and `loss` need nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from sleep_jax.ops import gated_delta
from sleep_jax.ops import gated_delta_pallas

BLOCK_KINDS = {
    "A": ("attention", True),
    "G": ("fast_weight", True),
    "a": ("attention", False),
    "g": ("fast_weight", False),
}
EVICTIONS = ("hard", "sliding", "none")
RULES = ("gated_delta", "hebbian")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
DELTA_IMPLS = ("auto", "scan", "chunked", "pallas")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")


def _fail(field: str, message: str) -> None:
  raise ValueError(f"ModelConfig.{field}: {message}")


def _default_dtype(backend: str) -> str:
  """The compute dtype of ``dtype=None`` on ``backend``."""
  return "float32" if backend == "cpu" else "bfloat16"


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(name, f"must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static configuration of a hybrid attention / fast-weight model.

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    num_heads: heads of every mixer (attention and fast-weight).
    layout: one letter per block, in order. `A`: attention block, `G`: fast-weight (Gated
      DeltaNet) block, both followed by a SwiGLU MLP; lower-case `a` / `g` are the same mixers
      without an MLP (the paper inserts fast-weight layers without MLP into pretrained models).
    window: L, tokens per window (the context window); eviction happens every L tokens.
    eviction: "hard" (drop the whole window cache after sleep), "sliding" (keep the K/V of the last
      L - 1 tokens, so every token attends to at most L tokens), or "none" (no eviction: a plain
      causal model over the whole sequence; used for the full-attention upper-bound baseline).
    rule: fast-weight update rule, "gated_delta" or "hebbian".
    head_dim: per-head width; defaults to d_model // num_heads.
    mlp_dim: hidden width of the SwiGLU MLP; defaults to 8/3 * d_model rounded up to 64.
    conv_size: width of the causal depthwise short convolution on q, k, v of fast-weight blocks.
    rope_base: RoPE frequency base.
    norm_eps: epsilon of every RMSNorm.
    dtype: compute dtype; None picks bfloat16 on GPU/TPU and float32 on CPU. Parameters are always
      float32 and the fast-weight state is always float32.
    remat: `jax.checkpoint` policy applied to every pass ("none" disables rematerialisation).
    delta_impl: implementation of the fast-weight op ("auto", "scan", "chunked" or "pallas";
      see `sleep_jax.ops.gated_delta_rule`; "auto" picks per backend when the model is traced).
    chunk_size: chunk length of the chunkwise-parallel op; None picks it per backend when the
      model is traced (`sleep_jax.ops.default_chunk_size`: 32 on CPU, 16 there for head_dim
      <= 32, 64 on GPU and TPU).
      Compiling ahead of time for another platform than the host's (a TPU topology from a CPU
      host), set it, `dtype` and `delta_impl` as that platform would (`for_backend`).
    attention_impl: forwarded to `jax.nn.dot_product_attention` (None lets JAX choose, and JAX
      0.10 then runs XLA everywhere; "cudnn" for cuDNN's fused kernels on a GPU). "splash": on
      a TPU, passes without a window cache (training and `sleep` under hard eviction) run JAX's
      splash-attention kernel, which skips the tiles the causal or sliding mask removes; passes
      behind a cache attend by XLA. Elsewhere the same kernel runs in the Pallas interpreter
      (slow; for tests).
    scan_layers: run the blocks of a pass over more than one token as a `lax.scan` over the
      repeats of the layout's unit (e.g. "AG" for "AG" * 12): the compiled program holds one
      copy of the unit instead of every block, so it compiles several times faster. Parameters
      keep their per-block layout (they are stacked inside the pass). One-token decode steps keep
      the unrolled blocks (scanning would copy the window cache on every token).
    delta_unroll: chunk steps per iteration of the fast-weight op's loop over chunks (the
      `unroll` of `sleep_jax.ops.gated_delta_rule`); a value at least the number of chunks in a
      pass (e.g. 1024) leaves no loop: every chunk step is written out, which lets a GPU run a
      pass's kernels as CUDA graphs instead of launching each from the host
      (docs/performance.md), at the cost of compile time. Same results.
  """

  vocab_size: int
  d_model: int = 256
  num_heads: int = 4
  layout: str = "AGAG"
  window: int = 24
  eviction: str = "hard"
  rule: str = "gated_delta"
  head_dim: Optional[int] = None
  mlp_dim: Optional[int] = None
  conv_size: int = 4
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: Optional[str] = None
  remat: str = "nothing_saveable"
  delta_impl: str = "auto"
  chunk_size: Optional[int] = None
  attention_impl: Optional[str] = None
  scan_layers: bool = False
  delta_unroll: int = 1

  def __post_init__(self):
    _check_positive_int("vocab_size", self.vocab_size, 2)
    _check_positive_int("d_model", self.d_model)
    _check_positive_int("num_heads", self.num_heads)
    if self.head_dim is None and self.d_model % self.num_heads:
      _fail("num_heads", f"must divide d_model={self.d_model} when head_dim is not given, "
            f"got {self.num_heads}")
    if self.head_dim is not None:
      _check_positive_int("head_dim", self.head_dim)
    if self.mlp_dim is not None:
      _check_positive_int("mlp_dim", self.mlp_dim)
    if not isinstance(self.layout, str) or not self.layout:
      _fail("layout", f"must be a non-empty string of block letters {sorted(BLOCK_KINDS)}, "
            f"got {self.layout!r}")
    bad = sorted(set(self.layout) - set(BLOCK_KINDS))
    if bad:
      _fail("layout", f"unknown block letters {bad} in {self.layout!r}; allowed: 'A' attention, "
            "'G' fast-weight, lower case for the same block without MLP")
    _check_positive_int("window", self.window)
    if self.eviction not in EVICTIONS:
      _fail("eviction", f"must be one of {EVICTIONS}, got {self.eviction!r}")
    if self.rule not in RULES:
      _fail("rule", f"must be one of {RULES}, got {self.rule!r}")
    _check_positive_int("conv_size", self.conv_size)
    if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
      _fail("rope_base", f"must be a number > 1, got {self.rope_base!r}")
    if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
      _fail("norm_eps", f"must be in (0, 1), got {self.norm_eps!r}")
    if self.dtype is not None and self.dtype not in DTYPES:
      _fail("dtype", f"must be None or one of {DTYPES}, got {self.dtype!r}")
    if self.remat not in REMAT_POLICIES:
      _fail("remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.delta_impl not in DELTA_IMPLS:
      _fail("delta_impl", f"must be one of {DELTA_IMPLS}, got {self.delta_impl!r}")
    if self.chunk_size is not None:
      _check_positive_int("chunk_size", self.chunk_size)
    if self.delta_impl == "pallas":
      # With chunk_size None, check the smallest per-backend default (all are powers of two)
      # rather than ask JAX for its backend before the model is traced.
      chunk = (min(gated_delta.default_chunk_size(backend, self.resolved_head_dim)
                   for backend in gated_delta.CHUNK_SIZES) if self.chunk_size is None
               else self.chunk_size)
      problem = gated_delta_pallas.supported(chunk, self.resolved_head_dim,
                                             self.resolved_head_dim)
      if problem:
        _fail("delta_impl", f"'pallas': {problem} (Dk = Dv = head_dim); change it or use "
              "delta_impl='chunked'")
    if not isinstance(self.scan_layers, bool):
      _fail("scan_layers", f"must be True or False, got {self.scan_layers!r}")
    if self.scan_layers and self.layer_unit == self.num_layers:
      _fail("scan_layers", f"needs a layout that repeats a shorter pattern (such as 'AG' * 12), "
            f"got {self.layout!r}; set scan_layers=False")
    _check_positive_int("delta_unroll", self.delta_unroll)
    if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLS:
      _fail("attention_impl", f"must be None or one of {ATTENTION_IMPLS}, "
            f"got {self.attention_impl!r}")

  # Derived, static quantities.

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_mlp_dim(self) -> int:
    if self.mlp_dim is not None:
      return self.mlp_dim
    return -(-(8 * self.d_model // 3) // 64) * 64

  @property
  def num_layers(self) -> int:
    return len(self.layout)

  @property
  def layer_unit(self) -> int:
    """Length of the shortest pattern of block letters whose repeats make up the layout."""
    n = len(self.layout)
    return next(u for u in range(1, n + 1)
                if n % u == 0 and self.layout[:u] * (n // u) == self.layout)

  @property
  def block_kinds(self) -> tuple[tuple[str, bool], ...]:
    """(mixer, has_mlp) for every block, in order."""
    return tuple(BLOCK_KINDS[c] for c in self.layout)

  @property
  def fast_weight_layers(self) -> tuple[int, ...]:
    return tuple(i for i, (kind, _) in enumerate(self.block_kinds) if kind == "fast_weight")

  @property
  def attention_layers(self) -> tuple[int, ...]:
    return tuple(i for i, (kind, _) in enumerate(self.block_kinds) if kind == "attention")

  @property
  def cache_capacity(self) -> Optional[int]:
    """Attention K/V slots of the window cache: L (hard), 2L - 1 (sliding), unbounded (none)."""
    if self.eviction == "hard":
      return self.window
    if self.eviction == "sliding":
      return 2 * self.window - 1
    return None

  @property
  def resolved_chunk_size(self) -> int:
    """`chunk_size`, or the current backend's default when it is None."""
    if self.chunk_size is not None:
      return self.chunk_size
    return gated_delta.default_chunk_size(head_dim=self.resolved_head_dim)

  @property
  def compute_dtype(self) -> jnp.dtype:
    if self.dtype is not None:
      return jnp.dtype(self.dtype)
    return jnp.dtype(_default_dtype(jax.default_backend()))

  def for_backend(self, backend: str) -> "ModelConfig":
    """This config with the choices it leaves to the library made as on ``backend``
    ("cpu", "gpu" or "tpu"), whatever the host: ``dtype=None`` becomes that backend's compute
    dtype, ``chunk_size=None`` its chunk for this head size, and ``delta_impl="auto"`` the
    implementation "auto" runs there ("chunked" on GPU and TPU; on CPU it stays "auto", whose
    CPU form depends on whether the call is differentiated). Otherwise all three follow
    ``jax.default_backend()`` when the model is traced, which is the host's when compiling
    ahead of time for another platform (a TPU topology or a described GPU on a CPU host).
    Values the config sets are kept."""
    if backend not in gated_delta.CHUNK_SIZES:
      raise ValueError(f"ModelConfig.for_backend: backend must be one of "
                       f"{tuple(gated_delta.CHUNK_SIZES)}, got {backend!r}")
    changes = {}
    if self.dtype is None:
      changes["dtype"] = _default_dtype(backend)
    if self.chunk_size is None:
      changes["chunk_size"] = gated_delta.default_chunk_size(backend, self.resolved_head_dim)
    if self.delta_impl == "auto" and backend != "cpu":
      changes["delta_impl"] = gated_delta.resolve_impl("auto", backend)
    return self.replace(**changes)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
