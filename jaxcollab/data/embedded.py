"""Datasets that ship with the Python environment, so training works offline on a fresh machine.

`digits`: scikit-learn's 1,797 8x8 handwritten digits with a fixed, seeded, stratified split.
`pydocs`: the English text of CPython's bundled documentation topics as UTF-8 bytes.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

import numpy as np

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
PYDOCS_TRAIN_FRACTION = 0.9
# The digits split, computed once per machine with scikit-learn, is kept here as arrays.
DATA_CACHE = os.environ.get(
  "JAXCOLLAB_DATA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxcollab", "data")
)


def _digits_cache_path() -> str:
  # The split depends on scikit-learn's train_test_split, so its version names the file.
  version = importlib.metadata.version("scikit-learn")
  return os.path.join(DATA_CACHE, f"digits-split{DIGITS_SPLIT_SEED}-{DIGITS_TEST_FRACTION}-sklearn{version}.npz")


def _split_digits() -> dict[str, np.ndarray]:
  # Imported here: scikit-learn takes 1-5 s to import, and only the first run on a machine needs it.
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  # Pixel values are integer counts 0..16 (4x4 blocks of a 32x32 bitmap).
  images = (digits.images.astype(np.float32) / 16.0)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
    images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
  )
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@functools.lru_cache(maxsize=1)
def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train": (images, labels), "test": (...)}: float32 [N,8,8,1] in [0,1], int32 [N]; resident once read."""
  path = _digits_cache_path()
  try:
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError):
    arrays = _split_digits()
    try:  # A cache only: a read-only home directory costs the sklearn import each run, nothing else.
      os.makedirs(DATA_CACHE, exist_ok=True)
      tmp = f"{path}.{os.getpid()}.tmp.npz"
      np.savez(
        tmp, x_train=arrays["x_train"], y_train=arrays["y_train"], x_test=arrays["x_test"], y_test=arrays["y_test"]
      )
      os.replace(tmp, path)  # Atomic: concurrent first runs never read a half-written file.
    except OSError:
      pass
  return {"train": (arrays["x_train"], arrays["y_train"]), "test": (arrays["x_test"], arrays["y_test"])}


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
