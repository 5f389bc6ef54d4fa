"""Multi-hop retrieval on a shuffled directed cycle ("Depo"; paper section 6.2).

    python -m experiments.train --config=experiments/configs/multi_hop.py:smoke --workdir=/tmp/mh_smoke
    python -m experiments.train --config=experiments/configs/multi_hop.py:small --workdir=runs/mh_small_n2
    python -m experiments.train --config=experiments/configs/multi_hop.py:paper --config.n=4 --workdir=runs/mh_n4
    python -m experiments.train --config=experiments/configs/multi_hop.py:paper,hybrid_n1 --workdir=runs/mh_n1
    python -m experiments.train --config=experiments/configs/multi_hop.py:paper,full_attention --workdir=runs/mh_full

Presets: `smoke` (seconds; tests), `small` (a 20-node cycle, hops up to 8, d = 64; one CPU in
about 30 minutes), `paper` (75 nodes, hops 1..16, 10 layers AGAG..., d = 512, batch 128, Muon lr
2e-3, AdamW lr 5e-5; the paper compares N = 1, 2, 4). Append `,<variant>` for a baseline.
"""

from experiments.configs import common


def _smoke(c):
  common.smoke(c)
  c.task.params.num_nodes = 8
  c.task.params.train_hops = (1, 4)
  c.task.params.eval_hops = (1, 2, 4)
  c.task.params.num_queries = 4


def _small(c):
  c.task.params.num_nodes = 20
  c.task.params.train_hops = (1, 8)
  c.task.params.eval_hops = (1, 2, 4, 8)
  common.set_model(c, d_model=64, num_heads=4, layout="AGAG")
  common.set_run(c, n=2, batch_size=16, steps=1000, warmup_steps=50, **common.SMALL_LRS,
                 eval_every=250, eval_examples=512, checkpoint_every=250, log_every=25)


def _paper(c):
  c.task.params.num_nodes = 75
  c.task.params.train_hops = (1, 16)
  c.task.params.eval_hops = (1, 2, 4, 8, 16)
  common.set_model(c, d_model=512, num_heads=8, layout="AG" * 5)
  common.set_run(c, n=4, batch_size=128, steps=20_000, muon_lr=2e-3, adam_lr=5e-5,
                 warmup_steps=500, eval_every=1000, eval_examples=1000, checkpoint_every=1000,
                 log_every=100)


PRESETS = {"smoke": _smoke, "small": _small, "paper": _paper}


def get_config(arg=None):
  return common.build("multi_hop", arg, PRESETS)
