"""Tests for jaxcollab/data/catalog.py: the real TFDS loading code under tfds.testing.mock_data."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcollab import config as config_lib
from jaxcollab import data
from jaxcollab.data import catalog
from jaxcollab.errors import UserError


def _config(name, data_dir, **dataset):
  c = config_lib.defaults()
  c.dataset.name, c.dataset.data_dir = name, str(data_dir)
  for k, v in dataset.items():
    c.dataset[k] = v
  return c


def test_mnist_end_to_end(tmp_path):
  with tfds.testing.mock_data(num_examples=50):
    ds = data.get_dataset(_config("mnist", tmp_path, augment=True))
    assert (ds.info.train_size, ds.info.eval_size, ds.info.image_shape) == (50, 50, (28, 28, 1))
    batch = next(ds.train_iterator(batch_size=16, seed=0))
    assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and 0.5 < batch["image"].max() <= 1.0  # Scaled from uint8.
    assert batch["label"].dtype == np.int32 and ((0 <= batch["label"]) & (batch["label"] < 10)).all()
    masks = [b["mask"] for p in range(2) for b in ds.eval_batches(batch_size=16, process_index=p, process_count=2)]
    assert sum(m.sum() for m in masks) == 50 and len(masks) == 2 * ds.num_eval_batches(16, 2)


def test_tiny_shakespeare_end_to_end(tmp_path):
  with tfds.testing.mock_data(num_examples=30):
    ds = data.get_dataset(_config("tiny_shakespeare", tmp_path, seq_len=16))
    val = catalog.text_bytes("tiny_shakespeare", "validation", str(tmp_path))
    assert ds.info.eval_split == "validation" and ds.info.vocab_size == 256
    batch = next(ds.train_iterator(batch_size=4, seed=0))
    assert batch["inputs"].shape == batch["targets"].shape == (4, 16) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].max() < 256
    # mock_data joins 30 random records of ' abcdefghij' with newlines.
    assert set(np.unique(val)) <= set(b" abcdefghij\n")
    scored = sum(b["mask"].sum() for b in ds.eval_batches(batch_size=4))
    assert scored == len(val) - 1


def test_text_bytes_respects_the_cap(tmp_path):
  with tfds.testing.mock_data(num_examples=30):
    assert len(catalog.text_bytes("lm1b", "train", str(tmp_path), max_bytes=100)) == 100


@pytest.mark.parametrize("name", ["mnist", "tiny_shakespeare"])
def test_unprepared_dataset_is_a_fast_user_error(tmp_path, name):
  start = time.perf_counter()
  with pytest.raises(UserError, match=f"tfds build {name}"):
    data.get_dataset(_config(name, tmp_path))
  assert time.perf_counter() - start < 10


def test_text_arrives_as_str_or_bytes():
  assert catalog._as_bytes("é") == catalog._as_bytes(b"\xc3\xa9") == catalog._as_bytes(np.array(b"\xc3\xa9"))  # pylint: disable=protected-access
