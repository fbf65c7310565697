"""Tests for jaxcollab/data/pipeline.py (and get_dataset): grain train/eval batches on embedded data."""

import collections
import json

import jax
import numpy as np
import pytest

from jaxcollab import config as config_lib
from jaxcollab import data
from jaxcollab.data import augment as augment_lib
from jaxcollab.data import pipeline
from jaxcollab.errors import UserError


def _config(name="digits", **dataset):
  c = config_lib.defaults()
  c.dataset.name = name
  for k, v in dataset.items():
    c.dataset[k] = v
  return c


def _indexed(n, augment=False):
  """A dataset whose label is the example's id, so batches show exactly which examples they hold."""
  images = np.random.default_rng(n).random((n, 8, 8, 1), dtype=np.float32)
  examples = pipeline.ImageExamples((images, np.arange(n, dtype=np.int32)))
  info = pipeline.DatasetInfo("ids", "image", n, n, "test", (8, 8, 1), n, None, None)
  return pipeline.Dataset(info, examples, lambda split: examples, augment=augment)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_unknown_dataset_name_lists_valid_names():
  with pytest.raises(UserError, match="did you mean .mnist.*choose one of cifar10, digits"):
    data.get_dataset(_config("mnits"))


def test_image_train_batch_format():
  ds = data.get_dataset(_config())
  batch = next(ds.train_iterator(batch_size=32, seed=0))
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["mask"], np.ones(32))


def test_same_seed_same_batches_and_different_seed_differs():
  ds = data.get_dataset(_config())
  first = _take(ds.train_iterator(batch_size=64, seed=1), 3)
  _assert_same(first, _take(ds.train_iterator(batch_size=64, seed=1), 3))
  other = _take(ds.train_iterator(batch_size=64, seed=2), 3)
  assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_each_epoch_is_a_new_permutation():
  it = _indexed(100).train_iterator(batch_size=10, seed=0)
  epochs = [np.concatenate([b["label"] for b in _take(it, 10)]) for _ in range(2)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
  assert not np.array_equal(epochs[0], epochs[1])


def test_processes_see_disjoint_shards_that_make_the_global_batch():
  ds = _indexed(101)
  # 101 // (10 * 2) = 5 steps per epoch; one example is left out each epoch.
  shards = [
    np.concatenate(
      [b["label"] for b in _take(ds.train_iterator(batch_size=10, seed=0, process_index=p, process_count=2), 5)]
    )
    for p in range(2)
  ]
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0]) | set(shards[1])) == 100
  # Step s of both processes together is step s of one process with the global batch.
  single = _take(ds.train_iterator(batch_size=20, seed=0), 5)
  for step in range(5):
    together = set(shards[0][step * 10 : (step + 1) * 10]) | set(shards[1][step * 10 : (step + 1) * 10])
    assert together == set(single[step]["label"])


@pytest.mark.parametrize("augment", [False, True])
def test_resume_from_state_matches_uninterrupted(augment):
  ds = data.get_dataset(_config(augment=augment))
  # 1437 // 500 = 2 steps per epoch, so the resumed stretch crosses epoch boundaries.
  uninterrupted = _take(ds.train_iterator(batch_size=500, seed=5), 7)
  it = ds.train_iterator(batch_size=500, seed=5)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  fresh = data.get_dataset(_config(augment=augment)).train_iterator(batch_size=500, seed=5)
  fresh.set_state(state)
  _assert_same(uninterrupted[3:], _take(fresh, 4))


def test_augmentation_adds_draws_that_the_step_applies_without_changing_order_shape_or_range():
  plain = next(data.get_dataset(_config()).train_iterator(batch_size=128, seed=0))
  drawn = next(data.get_dataset(_config(augment=True)).train_iterator(batch_size=128, seed=0))
  assert set(drawn) == set(plain) | {augment_lib.KEY}
  for k in plain:  # The pipeline only draws; the images are moved in the train step.
    np.testing.assert_array_equal(plain[k], drawn[k])
  augmented = {k: np.asarray(v) for k, v in augment_lib.apply_to_batch(drawn).items()}
  assert set(augmented) == set(plain)
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert augmented["image"].shape == plain["image"].shape and augmented["image"].dtype == np.float32
  assert 0.0 <= augmented["image"].min() and augmented["image"].max() <= 1.0
  changed = np.abs(augmented["image"] - plain["image"]).reshape(128, -1).max(axis=1) > 1e-3
  assert changed.mean() > 0.9


def test_text_augment_flag_is_ignored():
  ds = data.get_dataset(_config("pydocs", seq_len=32, augment=True))
  batch = next(ds.train_iterator(batch_size=4, seed=0))
  assert set(batch) == {"inputs", "targets", "mask"}


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_each_example_once(process_count):
  ds = _indexed(103)
  per_process = [
    list(ds.eval_batches(batch_size=8, process_index=p, process_count=process_count)) for p in range(process_count)
  ]
  expected = ds.num_eval_batches(8, process_count)
  assert [len(b) for b in per_process] == [expected] * process_count
  ids = [i for batches in per_process for b in batches for i in b["label"][b["mask"] == 1]]
  assert sorted(ids) == list(range(103))
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (8, 8, 8, 1)
      pad = b["mask"] == 0
      assert not b["image"][pad].any() and not b["label"][pad].any()


def test_digits_eval_matches_test_split_labels():
  ds = data.get_dataset(_config())
  labels = [
    l
    for p in range(2)
    for b in ds.eval_batches(batch_size=64, process_index=p, process_count=2)
    for l in b["label"][b["mask"] == 1]
  ]
  assert collections.Counter(labels) == collections.Counter(data.embedded.digits_arrays()["test"][1].tolist())


def test_pydocs_info_and_windows():
  ds = data.get_dataset(_config("pydocs", seq_len=64))
  train = data.pydocs_bytes("train")
  assert ds.info.kind == "text" and ds.info.vocab_size == 256 and ds.info.eval_split == "validation"
  assert ds.info.train_size == (len(train) - 1) // 64
  batch = next(ds.train_iterator(batch_size=16, seed=0))
  assert batch["inputs"].shape == (16, 64) and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  np.testing.assert_array_equal(batch["mask"], np.ones((16, 64)))
  windows = train[: ds.info.train_size * 64].reshape(-1, 64)
  for row in batch["inputs"]:
    assert (windows == row).all(axis=1).any()


@pytest.mark.parametrize("process_count", [1, 2])
def test_pydocs_eval_scores_every_validation_byte_once(process_count):
  ds = data.get_dataset(_config("pydocs", seq_len=100))
  val = data.pydocs_bytes("validation")
  assert ds.info.eval_size == -(-(len(val) - 1) // 100)  # The short tail is kept, padded.
  windows = {}
  for p in range(process_count):
    for i, b in enumerate(ds.eval_batches(batch_size=32, process_index=p, process_count=process_count)):
      for r in range(32):
        windows[(i * 32 + r) * process_count + p] = b["targets"][r][b["mask"][r] == 1]
  scored = np.concatenate([windows[k] for k in sorted(windows)])
  np.testing.assert_array_equal(scored, val[1:])


def test_batch_larger_than_train_split_is_a_user_error():
  with pytest.raises(UserError, match="train.batch_size"):
    data.get_dataset(_config()).train_iterator(batch_size=800, seed=0, process_count=2)


def test_bad_process_index_is_a_user_error():
  with pytest.raises(UserError, match="process_index"):
    data.get_dataset(_config()).eval_batches(batch_size=8, process_index=2, process_count=2)


def test_datasets_registry_is_cheap_and_typed():
  assert {"digits", "pydocs", "mnist", "fashion_mnist", "cifar10", "tiny_shakespeare", "lm1b"} == set(data.DATASETS)
  assert {s.kind for s in data.DATASETS.values()} == {"image", "text"}


def _epoch(ds, batch_size, process_index=0, process_count=1, seed=0):
  it = ds.train_iterator(batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count)
  return _take(it, len(ds._train) // (batch_size * process_count))  # pylint: disable=protected-access


@pytest.mark.parametrize("process_count", [2, 4])
def test_augmented_global_batch_does_not_depend_on_process_count(process_count):
  ds = _indexed(96, augment=True)
  single = _epoch(ds, 24)
  shards = [_epoch(ds, 24 // process_count, p, process_count) for p in range(process_count)]
  for step, batch in enumerate(single):
    # Blocks stacked in process order are the single-process batch, augmentation draws and all.
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([s[step][k] for s in shards]), batch[k])


def test_augmented_stream_does_not_depend_on_batch_grouping():
  ds = _indexed(120, augment=True)
  by_10, by_40 = _epoch(ds, 10), _epoch(ds, 40)
  for k in ("image", "label", augment_lib.KEY):
    np.testing.assert_array_equal(np.concatenate([b[k] for b in by_10]), np.concatenate([b[k] for b in by_40]))


def test_augmentation_is_a_function_of_example_seed_and_stream_position():
  ds = _indexed(50, augment=True)
  images = ds._train.read_batch(np.arange(50))["image"]  # pylint: disable=protected-access
  it = ds.train_iterator(batch_size=10, seed=3)
  stream = _take(it, 12)  # 5 steps per epoch: crosses two epoch boundaries.
  for step, batch in enumerate(stream):
    positions = step * 10 + np.arange(10)
    np.testing.assert_array_equal(batch[augment_lib.KEY], augment_lib.draws(3, positions, 8))
    expected = augment_lib.augment_batch(images[batch["label"]], 3, positions)
    np.testing.assert_array_equal(np.asarray(jax.jit(augment_lib.apply_to_batch)(batch)["image"]), expected)
  # The same example in a later epoch is augmented anew.
  augmented = [np.asarray(augment_lib.apply_to_batch(b)["image"]) for b in stream]
  first = {int(l): im for l, im in zip(stream[0]["label"], augmented[0])}
  later = {int(l): im for b, a in zip(stream[5:10], augmented[5:10]) for l, im in zip(b["label"], a)}
  assert all(not np.array_equal(first[l], later[l]) for l in first)


def test_text_batches_match_windows_read_one_by_one():
  tokens = np.arange(1000, dtype=np.uint8)
  windows = pipeline.TextWindows(tokens, 64, pad_tail=True)
  batched = windows.read_batch(np.arange(len(windows)))
  for i in range(len(windows)):
    for k, v in windows[i].items():
      np.testing.assert_array_equal(batched[k][i], v)


def _records(ds):
  """The same examples as `ds`'s, served as records one by one (as TFDS sources are): grain's threaded path."""
  examples = ds._train  # pylint: disable=protected-access
  images, labels = examples._records  # pylint: disable=protected-access
  records = [{"image": images[i], "label": labels[i]} for i in range(len(examples))]
  return pipeline.Dataset(ds.info, pipeline.ImageExamples(records), lambda split: examples, augment=ds.augments)


@pytest.mark.parametrize("process_index", [0, 1])
def test_take_equals_next_stacked_across_epochs_and_leaves_the_same_state(process_index):
  ds = _indexed(50, augment=True)  # 50 // (5 * 2) = 5 steps per epoch.
  one, many = (ds.train_iterator(batch_size=5, seed=3, process_index=process_index, process_count=2) for _ in range(2))
  for count in (3, 4, 7, 1):  # Calls that start and end inside and across epochs.
    stacked = pipeline.take(many, count)
    batches = _take(one, count)
    for k, v in stacked.items():
      assert v.shape == (count, *batches[0][k].shape)
      np.testing.assert_array_equal(v, np.stack([b[k] for b in batches]))
    assert many.get_state() == one.get_state()


def test_resident_and_record_sources_give_the_same_batches_and_interchangeable_states():
  resident = _indexed(60, augment=True)
  threaded = _records(resident)
  fast, grained = resident.train_iterator(batch_size=8, seed=1), threaded.train_iterator(batch_size=8, seed=1)
  assert isinstance(fast, pipeline.TrainIterator) and not isinstance(grained, pipeline.TrainIterator)
  _assert_same(_take(fast, 9), _take(grained, 9))  # 7 steps per epoch: across a reshuffle.
  state = grained.get_state()
  assert fast.get_state() == state
  # Either source resumes from that state exactly (checkpoints so far hold grain's iterator state).
  expected = _take(fast, 3)
  for target in (resident, threaded):
    resumed = target.train_iterator(batch_size=8, seed=1)
    resumed.set_state(json.loads(json.dumps(state)))
    _assert_same(_take(resumed, 3), expected)
