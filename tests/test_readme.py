"""The README's API example runs as written."""

import pathlib
import re

import numpy as np


def test_readme_api_example_runs():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)
  assert np.isfinite(float(scope["loss"]))
  assert scope["new_tokens"].shape == (2, 40)
  assert all(s is None or s.dtype == np.float32 for s in scope["state"])
