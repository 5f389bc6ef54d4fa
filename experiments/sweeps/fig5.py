r"""Fig. 5: math word problems under sliding eviction, final accuracy per number of ops, N = 1, 2, 4.

    python -m experiments.sweeps.fig5 --preset=small --seeds=0,1,2 --root=runs
    python -m experiments.sweeps.fig5 --preset=paper --window=512 --seeds=0 --dry-run

One run per (N, seed): `<root>/fig5/n<N>_sliding_seed<s>/`. The paper's sliding runs use L = 512
(`--window=512` with the paper preset); by default the preset's window is kept.
"""

from __future__ import annotations

import sys

from experiments.sweeps import math_grid

FIGURE = "fig5"


def main(argv=None) -> int:
  return math_grid.main(FIGURE, "sliding", __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
