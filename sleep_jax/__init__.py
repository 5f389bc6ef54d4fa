"""sleep_jax: offline recurrent consolidation ("sleep") for hybrid fast-weight language models.

    config = sleep_jax.ModelConfig(vocab_size=..., layout="AGAG", window=24)
    params = sleep_jax.init(config, rng)
    state  = sleep_jax.init_state(params, batch_size)
    state  = sleep_jax.sleep(params, state, ctx, n)          # n offline passes over a window
    logits, state, cache = sleep_jax.wake(params, state, cache, tokens)
    loss, metrics = sleep_jax.loss(params, batch, n)
"""

from sleep_jax import ops
from sleep_jax import tasks
from sleep_jax.config import ModelConfig
from sleep_jax.model import Params
from sleep_jax.model import WindowCache
from sleep_jax.model import evict
from sleep_jax.model import inference_params
from sleep_jax.model import init
from sleep_jax.model import init_cache
from sleep_jax.model import init_state
from sleep_jax.model import sleep
from sleep_jax.model import sleep_window
from sleep_jax.model import wake
from sleep_jax.objective import loss
from sleep_jax.objective import score

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "Params", "WindowCache", "evict", "inference_params", "init", "init_cache",
    "init_state", "loss", "ops", "score", "tasks", "sleep", "sleep_window", "wake",
]
