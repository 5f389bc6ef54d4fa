r"""Fig. 2a: Rule 110 at N = 1 for several depths t (accuracy falls and comes later as t grows).

    python -m experiments.sweeps.fig2a --preset=small --seeds=0,1,2 --root=runs
    python -m experiments.sweeps.fig2a --preset=paper --ts=4,8,10,12,14,16 --seeds=0 --dry-run

One run per (t, seed): `<root>/fig2a/t<t>_seed<s>/`.
"""

from __future__ import annotations

import sys

from experiments.sweeps import common

FIGURE = "fig2a"
PAPER_TS = "4,8,10,12,14,16"


def add_flags(parser) -> None:
  parser.add_argument("--ts", default=PAPER_TS, help=f"Rule 110 depths t (default {PAPER_TS})")
  parser.add_argument("--n", type=int, default=1, help="sleep passes of every run (default 1)")


def make_specs(args, seeds) -> list[common.RunSpec]:
  ts = common.parse_ints("--ts", args.ts, 0, 4096)
  (n,) = common.parse_ints("--n", str(args.n), 1, 1024)
  return [common.RunSpec(FIGURE, f"t{t}_seed{seed}", "cellular_automaton", args.preset, seed,
                         {"n": n, "t": t}, {"n": n, "task.params.t": t})
          for t in ts for seed in seeds]


def main(argv=None) -> int:
  return common.main(FIGURE, __doc__.splitlines()[0], add_flags, make_specs, argv)


if __name__ == "__main__":
  sys.exit(main())
