"""One command per paper figure; each trains its grid of runs through `experiments.train`.

    python -m experiments.sweeps.fig2a --preset=small --seeds=0,1,2 --root=runs   # CA, N = 1, t = 4..16
    python -m experiments.sweeps.fig2b --preset=small --seeds=0,1,2 --root=runs   # CA, t = 32, N = 1..4
    python -m experiments.sweeps.fig3  --preset=small --seeds=0,1,2 --root=runs   # multi-hop, N = 1, 2, 4
    python -m experiments.sweeps.fig4  --preset=small --seeds=0,1,2 --root=runs   # math, hard eviction
    python -m experiments.sweeps.fig5  --preset=small --seeds=0,1,2 --root=runs   # math, sliding eviction
    python -m experiments.sweeps.fig6  --preset=small --root=runs                 # throughput vs N, L
    python -m experiments.report --runs=runs --out=docs/results

Every sweep takes `--dry-run` (print the commands), `--steps`, `--set=FIELD=VALUE` and `--force`.
"""
