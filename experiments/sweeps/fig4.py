r"""Fig. 4: math word problems under hard eviction, final accuracy per number of ops, N = 1, 2, 4.

    python -m experiments.sweeps.fig4 --preset=small --seeds=0,1,2 --root=runs
    python -m experiments.sweeps.fig4 --preset=paper --ns=1,2,4 --seeds=0 --dry-run

One run per (N, seed): `<root>/fig4/n<N>_hard_seed<s>/`. The paper fine-tunes pretrained models at
L = 2000; ours are trained from scratch at the preset's scale and window.
"""

from __future__ import annotations

import sys

from experiments.sweeps import math_grid

FIGURE = "fig4"


def main(argv=None) -> int:
  return math_grid.main(FIGURE, "hard", __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
