"""Datasets that ship with the Python environment, so training works offline on a fresh machine.

`digits`: scikit-learn's 1,797 8x8 handwritten digits with a fixed, seeded, stratified split.
`pydocs`: the English text of CPython's bundled documentation topics as UTF-8 bytes.
"""

from __future__ import annotations

import functools

import numpy as np

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
PYDOCS_TRAIN_FRACTION = 0.9


@functools.lru_cache(maxsize=1)
def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train": (images, labels), "test": (...)}: float32 [N,8,8,1] in [0,1], int32 [N]."""
  # Imported here so that `import jaxcollab.data` stays cheap.
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  # Pixel values are integer counts 0..16 (4x4 blocks of a 32x32 bitmap).
  images = (digits.images.astype(np.float32) / 16.0)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels)
  return {"train": (x_train, y_train), "test": (x_test, y_test)}


@functools.lru_cache(maxsize=1)
def _pydocs_corpus() -> bytes:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

  # Sorted keys: the corpus must not depend on dict order across Python builds.
  return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def pydocs_bytes(split: str = "train") -> np.ndarray:
  """The pydocs byte stream of `split` ("train": first 90%, "validation": last 10%) as uint8."""
  corpus = np.frombuffer(_pydocs_corpus(), dtype=np.uint8)
  cut = int(len(corpus) * PYDOCS_TRAIN_FRACTION)
  if split == "train":
    return corpus[:cut]
  if split == "validation":
    return corpus[cut:]
  raise ValueError(f"pydocs has splits 'train' and 'validation', not {split!r}.")


def unigram_entropy_bits(split: str = "train") -> float:
  """Entropy in bits per byte of the byte frequencies of pydocs `split`: the bpb of a unigram model."""
  counts = np.bincount(pydocs_bytes(split), minlength=256).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())
