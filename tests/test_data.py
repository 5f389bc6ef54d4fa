"""Tests of the Grain pipelines and the TFDS-stored evaluation splits."""

import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from sleep_jax import data, tasks
from sleep_jax.tasks import storage

CA = tasks.get("cellular_automaton", t=4)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {"tokens", "targets", "loss_mask"}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_train_batches_are_the_seeded_permutation_of_train_examples():
  iterator = data.make_train_iterator(CA, 32, seed=7, process_index=0, process_count=1)
  batches = take(iterator, 3)
  for step, batch in enumerate(batches):
    assert batch["tokens"].shape == (32, CA.seq_len) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].dtype == bool
    expected = CA.examples("train", data.train_indices(32, 7, step))
    np.testing.assert_array_equal(batch["tokens"], expected["tokens"])
    np.testing.assert_array_equal(batch["targets"], expected["targets"])
  # Indices are distinct across steps (a permutation) and the seed changes them.
  indices = np.concatenate([data.train_indices(32, 7, s) for s in range(200)])
  assert len(np.unique(indices)) == len(indices)
  assert indices.min() >= 0 and indices.max() < 2**40
  assert not set(indices) & set(np.concatenate([data.train_indices(32, 8, s) for s in range(200)]))
  # A batch that straddles a pass over all 2**40 indices still holds valid, distinct indices.
  last = data.train_indices(3, 7, (2**40) // 3)
  assert len(set(last)) == 3 and last.max() < 2**40


def test_processes_slice_the_global_batch():
  whole = next(data.make_train_iterator(CA, 24, seed=1, process_index=0, process_count=1))
  parts = [next(data.make_train_iterator(CA, 24, seed=1, process_index=p, process_count=4))
           for p in range(4)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.make_train_iterator(CA, 10, seed=1, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.make_train_iterator(CA, 8, seed=1, process_index=4, process_count=4)


def test_process_defaults_come_from_jax():
  import jax

  dataset = data.train_dataset(CA, 8, seed=0)
  assert len(dataset[0]["tokens"]) == 8 // jax.process_count()


def test_iterator_state_restores_the_exact_next_batches():
  iterator = data.make_train_iterator(CA, 16, seed=3, process_index=0, process_count=1)
  take(iterator, 5)
  state = iterator.get_state()
  expected = take(iterator, 3)
  restored = data.make_train_iterator(CA, 16, seed=3, process_index=0, process_count=1)
  restored.set_state(state)
  assert_same_batches(take(restored, 3), expected)
  from_step = data.make_train_iterator(CA, 16, seed=3, process_index=0, process_count=1, start_step=5)
  assert_same_batches(take(from_step, 3), expected)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  import orbax.checkpoint as ocp

  iterator = data.make_train_iterator(CA, 8, seed=5, process_index=0, process_count=1)
  take(iterator, 4)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": np.array(4, np.int32)}),
      data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 2)

  fresh = data.make_train_iterator(CA, 8, seed=5, process_index=0, process_count=1)
  restored = manager.restore(4, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"step": np.array(0, np.int32)}),
      data=grain.checkpoint.CheckpointRestore(fresh)))
  assert int(restored["state"]["step"]) == 4
  assert_same_batches(take(restored["data"], 2), expected)
  manager.close()


def test_worker_processes_give_the_same_stream(tmp_path):
  # Spawned workers must import the test's objects, so run the check as its own script.
  script = tmp_path / "workers.py"
  script.write_text(
      "import numpy as np\n"
      "from sleep_jax import data, tasks\n"
      "if __name__ == '__main__':\n"
      "    task = tasks.get('math', scale='tiny')\n"
      "    kw = dict(process_index=0, process_count=1)\n"
      "    plain = data.make_train_iterator(task, 8, 11, **kw)\n"
      "    ref = [next(plain)['tokens'] for _ in range(6)]\n"
      "    pool = data.make_train_iterator(task, 8, 11, worker_count=2, **kw)\n"
      "    got = [next(pool)['tokens'] for _ in range(3)]\n"
      "    state = pool.get_state()\n"
      "    again = data.make_train_iterator(task, 8, 11, worker_count=2, **kw)\n"
      "    again.set_state(state)\n"
      "    got += [next(again)['tokens'] for _ in range(3)]\n"
      "    assert all(np.array_equal(a, b) for a, b in zip(got, ref))\n"
      "    pool.close(); again.close()\n"
      "    print('same')\n")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_batches_cover_the_split_once_with_padding(process_count):
  task = tasks.get("multi_hop", num_test=50)
  seen, lengths = [], set()
  for p in range(process_count):
    batches = list(data.eval_batches(task, 16, process_index=p, process_count=process_count))
    lengths.add(len(batches))
    for batch in batches:
      assert batch["tokens"].shape == (16, task.seq_len)
      valid = batch["valid"]
      assert not batch["loss_mask"][~valid].any()
      expected = task.examples("test", batch["index"][valid])
      np.testing.assert_array_equal(batch["tokens"][valid], expected["tokens"])
      np.testing.assert_array_equal(batch["group"][valid], expected["group"])
      seen.extend(batch["index"][valid].tolist())
  assert sorted(seen) == list(range(50)) and len(lengths) == 1  # processes stay in step
  assert len(list(data.eval_batches(task, 16, num_examples=20))) == 2
  with pytest.raises(ValueError, match="num_examples"):
    list(data.eval_batches(task, 16, split="train"))
  with pytest.raises(ValueError, match="num_examples"):
    list(data.eval_batches(task, 16, num_examples=51))


@pytest.mark.parametrize("name,params", [("cellular_automaton", {"num_test": 40}),
                                         ("multi_hop", {"num_test": 20}),
                                         ("math", {"scale": "tiny", "num_test": 30})])
def test_tfds_split_round_trip(tmp_path, name, params):
  task = tasks.get(name, **params)
  path = storage.build(task, tmp_path, quiet=True)
  assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(path))
  stored = storage.load_split(task, "test", tmp_path)
  assert len(stored) == task.num_test
  generated = task.examples("test", np.arange(task.num_test))
  for i in (0, 7, task.num_test - 1):
    record = stored[i]
    for key in ("tokens", "targets", "loss_mask"):
      assert record[key].dtype == generated[key].dtype
      np.testing.assert_array_equal(record[key], generated[key][i])
    assert record["group"] == generated["group"][i] and record["index"] == i
  # Plain TFDS reads it too, by name.
  import tensorflow_datasets as tfds

  name = f"{storage.dataset_name(task)}/{task.config_name()}:{storage.VERSION}"
  plain = tfds.data_source(name, data_dir=str(tmp_path), split="test")
  np.testing.assert_array_equal(plain[3]["tokens"], generated["tokens"][3])
  from_disk = list(data.eval_batches(task, 16, data_dir=tmp_path))
  from_task = list(data.eval_batches(task, 16))
  for a, b in zip(from_disk, from_task, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  oracle = lambda tokens, targets, mask: (targets, np.zeros(targets.shape))
  metrics = task.evaluate(oracle, data_dir=tmp_path, batch_size=16)
  assert metrics["all"] == {"accuracy": 1.0, "exact": 1.0, "loss": 0.0, "count": task.num_test}


def test_loading_a_missing_or_different_split_fails(tmp_path):
  task = tasks.get("cellular_automaton", num_test=8)
  storage.build(task, tmp_path, quiet=True)
  other = tasks.get("cellular_automaton", t=5, num_test=8)
  with pytest.raises(ValueError, match="no built"):
    storage.load_split(other, "test", tmp_path)
  # A split whose stored vocabulary disagrees with the task is refused.
  info = os.path.join(storage.split_dir(task, tmp_path), "metadata.json")
  with open(info) as f:
    text = f.read()
  with open(info, "w") as f:
    f.write(text.replace('"Q0"', '"Q_0"'))
  with pytest.raises(ValueError, match="built with other"):
    storage.load_split(task, "test", tmp_path)


def test_build_command(tmp_path):
  out = subprocess.run([sys.executable, "-m", "sleep_jax.tasks.build", "--task=multi_hop",
                        "--num_nodes=5", "--num_test=6", f"--out={tmp_path}"],
                       capture_output=True, text=True, check=True)
  task = tasks.get("multi_hop", num_nodes=5, num_test=6)
  assert "6 test examples" in out.stdout
  assert len(storage.load_split(task, "test", tmp_path)) == 6
