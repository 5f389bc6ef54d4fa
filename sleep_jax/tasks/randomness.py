"""Counter-based random numbers: every example is a pure function of (task, split, index).

A task never holds a random generator. Each example gets a 64-bit key computed from the task's
parameters, its split and its index, and all of its random draws are hashes of that key and a
counter. This gives random access (any host can produce any example), bit-identical results across
processes and machines (only unsigned integer arithmetic, no Python ``hash``), and vectorises over
a batch of indices with numpy.

The mixer is the SplitMix64 finaliser, a bijection on 64-bit integers. Keys of train and test
examples are ``mix(base + GOLDEN * (2 * index + split))``: distinct ``(split, index)`` pairs map to
distinct keys, so the two splits come from disjoint seed streams by construction.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_COUNTER_STEP = np.uint64(0xD1B54A32D192ED03)  # a second odd constant: draws are not keys
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)

SPLITS = ("train", "test")


# Wrapping modulo 2**64 is the point of this arithmetic; numpy warns about it on scalars only.
_wrapping = np.errstate(over="ignore")


@_wrapping
def mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser, elementwise on uint64 arrays (wraps modulo 2**64)."""
  x = np.asarray(x, dtype=np.uint64)
  x = (x ^ (x >> np.uint64(30))) * _MUL1
  x = (x ^ (x >> np.uint64(27))) * _MUL2
  return x ^ (x >> np.uint64(31))


def task_key(name: str, params: dict) -> int:
  """A 64-bit key from a task's name and content-defining parameters (stable everywhere)."""
  text = name + "|" + ";".join(f"{k}={params[k]!r}" for k in sorted(params))
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@_wrapping
def example_keys(base: int, split: str, indices: np.ndarray) -> np.ndarray:
  """Per-example keys, uint64 [b]. ``split`` is "train" or "test"."""
  split_id = np.uint64(SPLITS.index(split))
  counter = np.asarray(indices, dtype=np.uint64) * np.uint64(2) + split_id
  return mix64(np.uint64(base) + _GOLDEN * counter)


@_wrapping
def draws(keys: np.ndarray, stream: int, count: int, start: int = 0) -> np.ndarray:
  """Draws ``start .. start + count - 1`` of sub-stream ``stream`` of every key: uint64 [b, count].

  Draw i of a stream depends on (key, stream, i) only, so draws can be taken in pieces.
  """
  stream_key = mix64(np.asarray(keys, dtype=np.uint64) ^ mix64(np.uint64(stream + 1) * _GOLDEN))
  counters = np.arange(start + 1, start + count + 1, dtype=np.uint64) * _COUNTER_STEP
  return mix64(stream_key[:, None] + counters[None, :])


def below(values: np.ndarray, n, *, low_half: bool = False) -> np.ndarray:
  """Maps uint64 draws to integers in [0, n) with the multiply-shift method: int64.

  Uses the draws' high 32 bits, or their low 32 bits with ``low_half`` (two independent integers
  from one draw). ``n`` may be an int or an array broadcastable against ``values``; the bias is
  below n / 2**32.
  """
  values = np.asarray(values, dtype=np.uint64)
  half = (values & np.uint64(0xFFFFFFFF)) if low_half else (values >> np.uint64(32))
  return ((half * np.asarray(n, dtype=np.uint64)) >> np.uint64(32)).astype(np.int64)


@_wrapping
def permute_index(positions: np.ndarray, seed, bits: int) -> np.ndarray:
  """A keyed bijection of [0, 2**bits) (uint64 in, int64 out), e.g. to shuffle train indices.

  ``seed`` is an int or a uint64 array broadcastable against ``positions`` (one permutation per
  key). Rounds of (add key, multiply by an odd constant, xor-shift) each permute the integers
  modulo 2**bits, so their composition is a permutation; four rounds mix well enough here.
  """
  if not 8 <= bits <= 62:
    raise ValueError(f"bits must be in [8, 62], got {bits}")
  mask = np.uint64((1 << bits) - 1)
  x = np.asarray(positions, dtype=np.uint64) & mask
  seed = np.asarray(seed, dtype=np.uint64)
  round_keys = mix64(seed[..., None] * _GOLDEN + np.arange(1, 5, dtype=np.uint64))  # [... 4]
  shift = np.uint64(bits // 2)
  for r in range(4):
    x = (x + round_keys[..., r]) & mask
    x = (x * _MUL1) & mask  # odd multiplier: invertible modulo 2**bits
    x = x ^ (x >> shift)
  return x.astype(np.int64)


def permute_below(positions: np.ndarray, seed, n: int) -> np.ndarray:
  """A keyed bijection of [0, n) (int64 in and out): ``permute_index`` plus cycle walking."""
  bits = max(8, (n - 1).bit_length())
  positions, seed = np.broadcast_arrays(np.asarray(positions), np.asarray(seed, np.uint64))
  seed = seed.ravel()
  x = permute_index(positions.ravel(), seed, bits)
  outside = np.flatnonzero(x >= n)
  while outside.size:  # walk each value's cycle of the permutation until it lands in [0, n)
    x[outside] = permute_index(x[outside], seed[outside], bits)
    outside = outside[x[outside] >= n]
  return x.reshape(positions.shape)
