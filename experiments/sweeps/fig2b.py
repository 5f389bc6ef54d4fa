r"""Fig. 2b: Rule 110 at a fixed depth t (the paper's t = 32), exact accuracy for N = 1..4.

    python -m experiments.sweeps.fig2b --preset=small --seeds=0,1,2 --root=runs
    python -m experiments.sweeps.fig2b --preset=paper --t=32 --ns=1,2,3,4 --seeds=0,1 --dry-run

One run per (N, seed): `<root>/fig2b/n<N>_t<t>_seed<s>/`. Every N sees the same data order.
"""

from __future__ import annotations

import sys

from experiments.sweeps import common

FIGURE = "fig2b"


def add_flags(parser) -> None:
  parser.add_argument("--t", type=int, default=32, help="Rule 110 depth t (default 32, the paper's)")
  parser.add_argument("--ns", default="1,2,3,4", help="sleep passes N (default 1,2,3,4)")


def make_specs(args, seeds) -> list[common.RunSpec]:
  (t,) = common.parse_ints("--t", str(args.t), 0, 4096)
  ns = common.parse_ints("--ns", args.ns, 1, 1024)
  return [common.RunSpec(FIGURE, f"n{n}_t{t}_seed{seed}", "cellular_automaton", args.preset, seed,
                         {"n": n, "t": t}, {"n": n, "task.params.t": t})
          for n in ns for seed in seeds]


def main(argv=None) -> int:
  return common.main(FIGURE, __doc__.splitlines()[0], add_flags, make_specs, argv)


if __name__ == "__main__":
  sys.exit(main())
