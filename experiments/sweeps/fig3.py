r"""Fig. 3: multi-hop retrieval, eval loss per hop count k while training, for N = 1, 2, 4.

    python -m experiments.sweeps.fig3 --preset=small --seeds=0,1,2 --root=runs
    python -m experiments.sweeps.fig3 --preset=paper --ns=1,2,4 --seeds=0 --dry-run

One run per (N, seed): `<root>/fig3/n<N>_seed<s>/`. The hop counts evaluated are the preset's
`task.params.eval_hops` (paper: 1, 2, 4, 8, 16).
"""

from __future__ import annotations

import sys

from experiments.sweeps import common

FIGURE = "fig3"


def add_flags(parser) -> None:
  parser.add_argument("--ns", default="1,2,4", help="sleep passes N (default 1,2,4)")


def make_specs(args, seeds) -> list[common.RunSpec]:
  ns = common.parse_ints("--ns", args.ns, 1, 1024)
  return [common.RunSpec(FIGURE, f"n{n}_seed{seed}", "multi_hop", args.preset, seed, {"n": n},
                         {"n": n})
          for n in ns for seed in seeds]


def main(argv=None) -> int:
  return common.main(FIGURE, __doc__.splitlines()[0], add_flags, make_specs, argv)


if __name__ == "__main__":
  sys.exit(main())
