"""benchmarks.gpu_aot: reading XLA's thunk sequence (on text written here in its format, with the
counts worked out by hand), and compiling for a described GPU from this host where JAX's CUDA
plugin is installed (marked `gpu_aot`: `pytest -m gpu_aot tests/test_gpu_aot.py`)."""

import json

import pytest

from benchmarks import gpu_aot

# One command buffer of three thunks; a while loop (5 trips) whose body holds a dynamic-slice
# fusion (one launch, its nested copy is how it runs), a kernel and a command buffer of two;
# then a kernel launched from the host.
SEQUENCE = """\
000: kCommandBuffer [source       | next=004 (1)]
    001: kCopy         [source        | sink         ] kCopy
    002: kCustomKernel [source        | next=003 (1) ] loop_add_fusion grid: [8, 1, 1]
    003: kCustomKernel [prev=002 (1)  | sink         ] gemm_fusion_dot grid: [64, 1, 1]
004: kWhile         [prev=000 (1) | next=012 (1)]
condition:
    005: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]
  body:
    006: kDynamicSliceFusion [source       | next=008 (1)] params=1, results=1
        007: kCopy [source | sink] kCopy
    008: kCustomKernel       [prev=006 (1) | next=009 (1)] gemm_fusion_dot_1 grid: [4, 1, 1]
    009: kCommandBuffer      [prev=008 (1) | sink        ]
        010: kCustomKernel [source       | next=011 (1)] loop_add_fusion_1 grid: [2, 1, 1]
        011: kCustomKernel [prev=010 (1) | sink        ] loop_add_fusion_2 grid: [2, 1, 1]
012: kCustomKernel [prev=004 (1) | sink] wrapped_convert grid: [16, 1, 1]
"""
METADATA = """\
thunk_metadata {
  thunk_info {
    profile_annotation: "while.3"
    thunk_id: 4
  }
  thunk_kind: "kWhile"
}
"""
HLO = """\
  %while.3 = (s32[], f32[8]{0}) while(%tuple.1), condition=%cond.1, body=%body.1, \
backend_config={"known_trip_count":{"n":"5"}}
"""


def test_parse_thunks_nests_by_indent_and_while_section():
  roots = gpu_aot.parse_thunks(SEQUENCE)
  assert [(t.id, t.kind) for t in roots] == [(0, "kCommandBuffer"), (4, "kWhile"),
                                              (12, "kCustomKernel")]
  assert [t.name for t in roots[0].children] == ["kCopy", "loop_add_fusion", "gemm_fusion_dot"]
  loop = roots[1]
  assert [t.id for t in loop.sections["condition"]] == [5]
  assert [t.id for t in loop.sections["body"]] == [6, 8, 9]
  assert [t.id for t in loop.sections["body"][0].children] == [7]
  assert [t.id for t in loop.sections["body"][2].children] == [10, 11]


def test_count_launches_multiplies_loop_bodies_by_their_trip_count():
  trips = gpu_aot.trip_counts(METADATA, HLO)
  assert trips == {4: 5}
  counts = gpu_aot.count_launches(gpu_aot.parse_thunks(SEQUENCE), trips)
  # Graphs: the first command buffer once, the body's five times.
  assert counts["graphs"] == 1 + 5
  # Inside graphs: 3 thunks once, 2 per iteration.
  assert counts["graph_kernels"] == 3 + 2 * 5
  # From the host: the condition 6 times (once more than the body), the dynamic-slice fusion
  # and the kernel of the body 5 times each, the last kernel once.
  assert counts["host_thunks"] == 6 + 5 + 5 + 1
  # One iteration: the condition, the fusion, the kernel and the body's graph.
  assert counts["loops"] == [{"trips": 5, "launches_per_iteration": 4}]


def test_count_launches_of_a_loop_of_unknown_trip_count_counts_one_iteration():
  counts = gpu_aot.count_launches(gpu_aot.parse_thunks(SEQUENCE), {})
  assert counts["loops"] == [{"trips": None, "launches_per_iteration": 4}]
  # Condition, fusion and kernel once each, and the last kernel.
  assert counts["host_thunks"] == 1 + 1 + 1 + 1 and counts["graphs"] == 2


def test_section_label_outside_a_loop_is_an_error():
  with pytest.raises(ValueError, match="outside a while"):
    gpu_aot.parse_thunks("body:\n000: kCopy [source | sink] kCopy\n")


def test_window_and_passes_default_per_target():
  assert (lambda a: (a.window, a.passes))(gpu_aot.parse_args(["--target=boundary"])) == (2048, 4)
  assert (lambda a: (a.window, a.passes))(gpu_aot.parse_args(["--target=wake"])) == (1024, 1)
  args = gpu_aot.parse_args(["--target=op", "--unroll=8"])
  assert args.unroll == 8 and gpu_aot.parse_args([]).unroll is True
  with pytest.raises(ValueError, match="--unroll must be an int >= 1 or 'full'"):
    gpu_aot.parse_args(["--unroll=0"])


def test_missing_plugin_names_the_packages(monkeypatch):
  monkeypatch.setattr(gpu_aot.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(gpu_aot.ToolchainMissing, match="jax-cuda12-plugin==.*jax-cuda12-pjrt=="):
    gpu_aot.check_plugin()


needs_plugin = pytest.mark.skipif(
    not gpu_aot.plugin_installed(),
    reason="JAX's CUDA plugin is not installed (pip install jax-cuda12-plugin jax-cuda12-pjrt)")


@pytest.mark.gpu_aot
@needs_plugin
def test_gpu_compile_counts_the_chunk_loop_and_its_unrolled_form(tmp_path):
  """T = 512 in chunks of 64: the chunked form's forward has one host-driven loop of 8 trips;
  written out (`unrolled`) it has no loop and every thunk runs in one command buffer."""
  rows = {}
  for impl in ("chunked", "unrolled"):
    out = tmp_path / f"{impl}.json"
    gpu_aot.main(["--target=op", f"--impl={impl}", "--shape=1x512x2x64", f"--out={out}"])
    (rows[impl],) = json.loads(out.read_text())["rows"]
  assert [l["trips"] for l in rows["chunked"]["loops"]] == [8]
  assert rows["chunked"]["host_thunks"] >= 8 * rows["chunked"]["loops"][0][
      "launches_per_iteration"]
  assert rows["unrolled"]["loops"] == [] and rows["unrolled"]["host_thunks"] == 0
  assert rows["unrolled"]["graphs"] == 1 and rows["unrolled"]["graph_kernels"] > 8
  assert all(r["argument_gib"] > 0 for r in rows.values())


@pytest.mark.gpu_aot
@needs_plugin
def test_gpu_compile_of_a_wake_step(tmp_path):
  out = tmp_path / "wake.json"
  gpu_aot.main(["--target=wake", "--d_model=128", "--heads=2", "--window=32", "--vocab=256",
                f"--out={out}"])
  (row,) = json.loads(out.read_text())["rows"]
  assert row["loops"] == [] and row["graph_kernels"] + row["host_thunks"] > 10
