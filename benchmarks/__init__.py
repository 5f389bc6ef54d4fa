"""Benchmark scripts: the fast-weight op (`ops`) and the model level (`attention`,
`wake_latency`, `sleep_cost`, `train_step`). Run them as modules from the repository root,
e.g. `python -m benchmarks.wake_latency`; `bash benchmarks/run_gpu.sh OUT_DIR` runs the GPU set."""
