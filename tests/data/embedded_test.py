"""Tests for jaxcollab/data/embedded.py: the offline digits and pydocs datasets."""

import numpy as np

from jaxcollab.data import embedded


def test_digits_split_sizes_range_and_determinism():
  arrays = embedded.digits_arrays()
  (x_train, y_train), (x_test, _) = arrays["train"], arrays["test"]
  assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert x_train.min() == 0.0 and x_train.max() == 1.0 and x_test.max() <= 1.0
  embedded.digits_arrays.cache_clear()
  again = embedded.digits_arrays()
  np.testing.assert_array_equal(again["test"][0], x_test)
  np.testing.assert_array_equal(again["train"][1], y_train)


def test_digits_split_is_stratified():
  arrays = embedded.digits_arrays()
  train = np.bincount(arrays["train"][1], minlength=10) / 1437
  test = np.bincount(arrays["test"][1], minlength=10) / 360
  # A stratified 20% split keeps every class within one example of its share.
  np.testing.assert_allclose(train, test, atol=1.5 / 360)


def test_pydocs_split_boundaries():
  train, validation = embedded.pydocs_bytes("train"), embedded.pydocs_bytes("validation")
  whole = embedded._pydocs_corpus()  # pylint: disable=protected-access
  assert len(train) + len(validation) == len(whole) > 400_000
  assert len(train) == int(0.9 * len(whole))
  assert bytes(train) + bytes(validation) == whole
  assert train.dtype == np.uint8
  # English text: far fewer than 256 distinct byte values.
  assert len(np.unique(train)) < 256


def test_pydocs_unigram_entropy_is_plausible():
  bits = embedded.unigram_entropy_bits("train")
  assert 3.0 < bits < 8.0
  # Computed independently from Python's own byte counts.
  counts = np.array([c for c in np.bincount(embedded.pydocs_bytes("train")) if c])
  p = counts / counts.sum()
  assert abs(bits - float(-(p * np.log2(p)).sum())) < 1e-9


def test_digits_cache_holds_the_same_split(tmp_path, monkeypatch):
  fresh = embedded._split_digits()  # pylint: disable=protected-access
  monkeypatch.setattr(embedded, "DATA_CACHE", str(tmp_path))
  embedded.digits_arrays.cache_clear()
  try:
    first = embedded.digits_arrays()  # Computes and writes the cache.
    assert len(list(tmp_path.iterdir())) == 1
    embedded.digits_arrays.cache_clear()
    second = embedded.digits_arrays()  # Reads it back.
  finally:
    embedded.digits_arrays.cache_clear()
  for arrays in (first, second):
    np.testing.assert_array_equal(arrays["train"][0], fresh["x_train"])
    np.testing.assert_array_equal(arrays["test"][1], fresh["y_test"])
    assert arrays["train"][0].dtype == np.float32 and arrays["train"][1].dtype == np.int32
