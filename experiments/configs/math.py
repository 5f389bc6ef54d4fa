"""GSM-Infinite-style math word problems (paper section 6.3), trained from scratch.

    python -m experiments.train --config=experiments/configs/math.py:smoke --workdir=/tmp/math_smoke
    python -m experiments.train --config=experiments/configs/math.py:small --workdir=runs/math_small_n2
    python -m experiments.train --config=experiments/configs/math.py:small,sliding --workdir=runs/math_small_sliding
    python -m experiments.train --config=experiments/configs/math.py:paper --config.n=4 --workdir=runs/math_n4
    python -m experiments.train --config=experiments/configs/math.py:paper,sliding --config.task.params.window=512 --workdir=runs/math_sliding_n4

Presets: `smoke` (the `tiny` scale; seconds), `small` (the `small` scale: L = 128, T = 512,
1..8 ops; d = 64, 1,000 steps; about 30 minutes on one CPU core), `paper` (the `paper` scale:
L = 2000, 2,000 to 3,300 tokens; batch 256, Muon lr 1e-3, AdamW lr 5e-5). The paper fine-tunes
pretrained 1.4-2B models; ours are trained from scratch, so the `paper` model size (8 blocks,
d = 512) is our choice. The paper's sliding-window runs use L = 512: `,sliding --config.task.params.window=512`.
"""

from experiments.configs import common


def _smoke(c):
  common.smoke(c)
  c.task.params.scale = "tiny"


def _small(c):
  c.task.params.scale = "small"
  common.set_model(c, d_model=64, num_heads=4, layout="AGAG")
  common.set_run(c, n=2, batch_size=16, steps=1000, warmup_steps=50, **common.SMALL_LRS,
                 eval_every=250, eval_examples=512, checkpoint_every=250, log_every=25)


def _paper(c):
  c.task.params.scale = "paper"
  common.set_model(c, d_model=512, num_heads=8, layout="AG" * 4)
  common.set_run(c, n=4, batch_size=256, steps=10_000, muon_lr=1e-3, adam_lr=5e-5,
                 warmup_steps=500, eval_every=1000, eval_examples=1600, checkpoint_every=500,
                 log_every=50)


PRESETS = {"smoke": _smoke, "small": _small, "paper": _paper}


def get_config(arg=None):
  return common.build("math", arg, PRESETS)
