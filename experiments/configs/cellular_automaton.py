"""Rule 110 cellular automaton (paper sections 4 and 6.1): 4 states of 24 cells, query after t steps.

    python -m experiments.train --config=experiments/configs/cellular_automaton.py:smoke --workdir=/tmp/ca_smoke
    python -m experiments.train --config=experiments/configs/cellular_automaton.py:small --workdir=runs/ca_small_n2
    python -m experiments.train --config=experiments/configs/cellular_automaton.py:small --config.n=1 --workdir=runs/ca_small_n1
    python -m experiments.train --config=experiments/configs/cellular_automaton.py:paper --config.n=3 --workdir=runs/ca_t32_n3
    python -m experiments.train --config=experiments/configs/cellular_automaton.py:paper,compute_matched --workdir=runs/ca_t32_n1_cm

Presets: `smoke` (seconds; tests), `small` (t = 4 on 2 states of 12 cells, d = 64, batch 64;
about 10 minutes on a CPU; the quickstart's setting), `paper` (t = 32, 4 blocks AGAG, d = 256, batch 512, Muon lr 2e-3, AdamW lr 5e-5; the paper trains
N in {1, 2, 3, 4}: set `--config.n`). Append `,<variant>` for a baseline (see baselines.py).
"""

from experiments.configs import common


def _smoke(c):
  common.smoke(c)
  c.task.params.t = 4


def _small(c):
  # The quickstart's task (docs/results.md): 2 states of 12 cells, one state per window. With the
  # paper's 4 states of 24 cells, a d = 64 model stayed at the constant predictor's accuracy for
  # every t from 4 to 16 in 600 steps, so the sweeps had nothing to compare.
  c.task.params.update(t=4, width=12, states=2, window=12)
  common.set_model(c, d_model=64, num_heads=4, layout="AGAG")
  common.set_run(c, n=2, batch_size=64, steps=1500, warmup_steps=50, **common.SMALL_LRS,
                 eval_every=250, eval_examples=512, checkpoint_every=250, log_every=25)


def _paper(c):
  c.task.params.t = 32
  common.set_model(c, d_model=256, num_heads=4, layout="AGAG")
  common.set_run(c, n=4, batch_size=512, steps=20_000, muon_lr=2e-3, adam_lr=5e-5,
                 warmup_steps=500, eval_every=1000, eval_examples=1000, checkpoint_every=1000,
                 log_every=100)


PRESETS = {"smoke": _smoke, "small": _small, "paper": _paper}


def get_config(arg=None):
  return common.build("cellular_automaton", arg, PRESETS)
