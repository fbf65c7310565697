"""Datasets by name: embedded (digits, pydocs) and TFDS (mnist, ..., lm1b), served as grain pipelines.

`DATASETS[name]` is a cheap `Spec` (nothing loads at import); `get_dataset(config)` loads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxcollab import choices
from jaxcollab.choices import DATASETS, Spec
from jaxcollab.data import catalog, embedded
from jaxcollab.data.embedded import pydocs_bytes, unigram_entropy_bits
from jaxcollab.data.pipeline import Dataset, DatasetInfo, ImageExamples, TextWindows
from jaxcollab.errors import UserError

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "Spec", "check", "get_dataset", "pydocs_bytes", "unigram_entropy_bits"]

BYTE_VOCAB = 256


def _split_loader(name: str, spec: Spec, data_dir: str) -> Callable[[str], Any]:
  """split -> that split's image examples, or its text as one array of byte tokens."""
  if name == "digits":
    return lambda split: ImageExamples(embedded.digits_arrays()[split])
  if name == "pydocs":
    return embedded.pydocs_bytes
  tfds_name = spec.tfds_name
  assert tfds_name is not None  # Every dataset but the embedded two comes from TFDS.
  if spec.kind == "image":
    # tfds images are uint8 0..255.
    return lambda split: ImageExamples(catalog.open_split(tfds_name, split, data_dir), scale=1 / 255)
  return functools.partial(catalog.text_bytes, tfds_name, data_dir=data_dir)


# Checked before jax starts (jaxcollab/choices.py), so a mistake in dataset.* is reported at once.
check = choices.check_dataset


def get_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset `config.dataset.name` with its train split loaded (TFDS: opened, not read)."""
  c = config.dataset
  spec = check(c)
  load = _split_loader(c.name, spec, c.data_dir)

  def split_examples(split: str) -> Any:
    if split not in spec.splits:
      raise UserError(f"Dataset {c.name!r} has no split {split!r}; use one of {', '.join(spec.splits)}.")
    loaded = load(split)
    # Eval windows keep the short tail (masked) so that every byte of the split is scored.
    return TextWindows(loaded, c.seq_len, pad_tail=True) if spec.kind == "text" else loaded

  train: Any
  if spec.kind == "text":
    train = TextWindows(load("train"), c.seq_len, pad_tail=False)
  else:
    train = load("train")
  if not len(train):
    raise UserError(
      f"The train split of {c.name!r} is shorter than one example of dataset.seq_len={c.seq_len} "
      "bytes; lower dataset.seq_len."
    )
  dataset = Dataset(
    DatasetInfo(
      name=c.name,
      kind=spec.kind,
      train_size=len(train),
      eval_size=0,
      eval_split=spec.eval_split,
      image_shape=spec.image_shape,
      num_classes=spec.num_classes,
      vocab_size=BYTE_VOCAB if spec.kind == "text" else None,
      seq_len=c.seq_len if spec.kind == "text" else None,
    ),
    train,
    split_examples,
    augment=c.augment,
    flip=c.flip,
    num_workers=c.num_workers,
  )
  # eval_size needs the eval split open; cheap for every dataset (TFDS opens lazily).
  dataset.info = dataclasses.replace(dataset.info, eval_size=len(dataset.examples()))
  return dataset
