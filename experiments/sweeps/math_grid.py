"""The grid of Figs. 4 and 5: math accuracy per number of operations, N = 1, 2, 4, one eviction.

Fig. 4 is hard eviction (the paper: L = 2000), Fig. 5 sliding eviction (the paper: L = 512, set
with `--window=512`; by default the preset's window is kept).
"""

from __future__ import annotations

from typing import Optional, Sequence

from experiments.sweeps import common


def add_flags(parser, default_window: str) -> None:
  parser.add_argument("--ns", default="1,2,4", help="sleep passes N (default 1,2,4)")
  parser.add_argument("--window", default=default_window,
                      help="window length L, or 'preset' for the preset's (default %(default)s)")


def make_specs(figure: str, eviction: str, args, seeds) -> list[common.RunSpec]:
  ns = common.parse_ints("--ns", args.ns, 1, 1024)
  overrides, grid_extra = {"model.eviction": eviction}, {}
  if args.window != "preset":
    (window,) = common.parse_ints("--window", args.window, 8, 65536)
    overrides["task.params.window"] = window
    grid_extra["window"] = window
  return [common.RunSpec(figure, f"n{n}_{eviction}_seed{seed}", "math", args.preset, seed,
                         {"n": n, "eviction": eviction, **grid_extra}, {"n": n, **overrides})
          for n in ns for seed in seeds]


def main(figure: str, eviction: str, doc: str, argv: Optional[Sequence[str]] = None) -> int:
  """The entry point of fig4 (hard) and fig5 (sliding)."""
  return common.main(figure, doc.splitlines()[0], lambda parser: add_flags(parser, "preset"),
                     lambda args, seeds: make_specs(figure, eviction, args, seeds), argv)
