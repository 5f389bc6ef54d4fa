r"""Streams tokens through a randomly initialised sleep model and prints what happens per window.

    python -m experiments.demo
    python -m experiments.demo --n=4 --eviction=sliding --windows=8 --window=64

For every window it prints the norm of the fast-weight state after the boundary, the time the
boundary (sleep) took, and the median wake latency per token inside the window. The wake latency
stays flat however many tokens came before: the window cache and the state have fixed sizes.
The weights are random, so the tokens' content means nothing here; `experiments.quickstart` trains.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import sleep_jax
from sleep_jax.streaming import Stream

_N = flags.DEFINE_integer("n", 3, "Sleep passes per boundary (>= 1).", lower_bound=1)
_WINDOW = flags.DEFINE_integer("window", 32, "Tokens per window (L).", lower_bound=2)
_WINDOWS = flags.DEFINE_integer("windows", 6, "Windows to stream.", lower_bound=1)
_EVICTION = flags.DEFINE_enum("eviction", "hard", ["hard", "sliding"], "Eviction at boundaries.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.", lower_bound=8)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the token stream.")


def main(argv):
  del argv
  config = sleep_jax.ModelConfig(vocab_size=256, d_model=_D_MODEL.value, num_heads=4,
                                 layout="AGAG", window=_WINDOW.value, eviction=_EVICTION.value)
  params = sleep_jax.init(config, jax.random.key(_SEED.value))
  L = config.window
  tokens = np.random.default_rng(_SEED.value).integers(0, config.vocab_size, (1, L * _WINDOWS.value))
  stream = Stream(params, batch_size=1, n=_N.value)

  # Compile outside the timed region: one token and one boundary on a throwaway stream.
  warm = Stream(params, batch_size=1, n=_N.value)
  warm.feed(tokens[:, :L])
  jax.block_until_ready(warm.state)

  print(f"layout {config.layout}, d_model {config.d_model}, window L={L}, eviction "
        f"{config.eviction}, n={_N.value} sleep passes per boundary")
  print(f"{'window':>6} {'tokens seen':>11} {'|state|':>9} {'wake us/token':>14} {'sleep ms':>9}")
  for w in range(_WINDOWS.value):
    latencies = []
    for i in range(L - 1):
      start = time.perf_counter()
      jax.block_until_ready(stream.feed(tokens[:, w * L + i:w * L + i + 1]))
      latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    stream.feed(tokens[:, (w + 1) * L - 1:(w + 1) * L])  # the last token triggers the boundary
    jax.block_until_ready(stream.state)
    boundary = time.perf_counter() - start
    norm = float(jnp.sqrt(sum(jnp.sum(s ** 2) for s in jax.tree.leaves(stream.state))))
    print(f"{w:>6} {stream.tokens_seen:>11} {norm:>9.3f} {1e6 * np.median(latencies):>14.0f} "
          f"{1e3 * boundary:>9.1f}")
  print("Only the fixed-size state crosses a boundary, so wake latency does not grow with the "
        "tokens seen (the first window's figures include warm-up noise).")


if __name__ == "__main__":
  app.run(main)
