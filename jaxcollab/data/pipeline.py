"""grain pipelines that turn random-access examples into per-process train and eval batches.

Batches are dicts of numpy arrays:
  image: {"image": float32 [B,H,W,C] in [0,1], "label": int32 [B], "mask": float32 [B]}
  text:  {"inputs": int32 [B,L], "targets": int32 [B,L], "mask": float32 [B,L]}
`mask` is 1 for real examples (or scored bytes) and 0 for padding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxcollab.data import augment as augment_lib
from jaxcollab.errors import UserError

Example = dict[str, Any]
# Batches are assembled in a background thread a few steps ahead; a small buffer because the
# CPU that prepares batches is the one that trains, and 500 buffered batches (grain's default)
# would compete with the train step for two cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What models and losses need to know about a dataset; no arrays."""

  name: str
  kind: str  # "image" | "text"
  train_size: int  # examples (text: windows of seq_len+1 bytes) in the train split.
  eval_size: int  # examples (text: windows, the last one possibly partial) in eval_split.
  eval_split: str  # "test" | "validation"
  image_shape: tuple[int, ...] | None  # (H, W, C) for images.
  num_classes: int | None  # classes for images.
  vocab_size: int | None  # 256 for byte-level text.
  seq_len: int | None  # tokens per text example.


class ImageExamples:
  """Random-access {"image": float32 [H,W,C] in [0,1], "label": int32} from arrays or a TFDS source."""

  def __init__(self, records: Sequence[Any] | tuple[np.ndarray, np.ndarray], scale: float = 1.0):
    # `records` is either (images, labels) arrays already in [0,1], or TFDS records with uint8
    # images that need `scale` (1/255); both are picklable, as grain worker processes need.
    self._records, self._scale = records, scale
    self._arrays = isinstance(records, tuple)

  def __len__(self) -> int:
    return len(self._records[1]) if self._arrays else len(self._records)

  def __getitem__(self, index: int) -> Example:
    if self._arrays:
      image, label = self._records[0][index], self._records[1][index]
    else:
      record = self._records[index]
      image, label = record["image"], record["label"]
    return {"image": np.asarray(image, np.float32) * np.float32(self._scale), "label": np.int32(label)}


class TextWindows:
  """Windows i*L .. i*L+L of a byte stream: inputs = bytes [s, s+L), targets = bytes [s+1, s+L+1).

  Consecutive windows overlap by one byte, so every byte after the first is a target exactly
  once. With `pad_tail` the last, shorter window is kept and padded with mask 0 (eval: every
  byte is scored); without it the tail is dropped (train: all windows are full).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, pad_tail: bool):
    self._tokens, self._seq_len = tokens, seq_len
    predicted = max(len(tokens) - 1, 0)
    self._length = math.ceil(predicted / seq_len) if pad_tail else predicted // seq_len

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Example:
    start = index * self._seq_len
    chunk = self._tokens[start:start + self._seq_len + 1].astype(np.int32)
    n = len(chunk) - 1
    inputs = np.zeros(self._seq_len, np.int32)
    targets = np.zeros(self._seq_len, np.int32)
    mask = np.zeros(self._seq_len, np.float32)
    inputs[:n], targets[:n], mask[:n] = chunk[:-1], chunk[1:], 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


@dataclasses.dataclass(frozen=True)
class _WithMask:
  """Adds mask 1 to image examples (text windows carry their own per-byte mask)."""

  def __call__(self, example: Example) -> Example:
    return example if "mask" in example else {**example, "mask": np.float32(1.0)}


@dataclasses.dataclass(frozen=True)
class _PaddedExample:
  """Index -> the example, or a zero example with mask 0 past the end of the split."""

  examples: Sequence[Example]
  padding: Example

  def __call__(self, index: int) -> Example:
    if index < len(self.examples):
      return _WithMask()(self.examples[index])
    return self.padding


def _padding_like(example: Example) -> Example:
  padding = {k: np.zeros_like(v) for k, v in _WithMask()(example).items()}
  return padding


class Dataset:
  """A dataset's info plus per-process train and eval iterators built with grain."""

  def __init__(self, info: DatasetInfo, train: Sequence[Example], split_examples: Callable[[str], Sequence[Example]],
               *, augment: bool = False, flip: bool = False, num_workers: int = 0):
    self.info = info
    self._train = train
    self._split_examples = split_examples
    self._augment = augment and info.kind == "image"
    self._flip = flip
    self._num_workers = num_workers
    self._splits: dict[str, Sequence[Example]] = {}

  def train_iterator(self, *, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> grain.DatasetIterator:
    """Infinite per-process train batches, reshuffled each epoch; `get_state`/`set_state` resume exactly."""
    _check_process(process_index, process_count)
    global_batch = batch_size * process_count
    steps_per_epoch = len(self._train) // global_batch
    if batch_size <= 0 or steps_per_epoch == 0:
      raise UserError(f"The global train batch ({batch_size} x {process_count} processes) must be between 1 and "
                      f"the {len(self._train)} train examples of {self.info.name!r}; lower train.batch_size.")
    # One global shuffled order per epoch, the same in every process (same seed); each epoch
    # is cut to whole global batches so that all processes take the same number of steps per
    # epoch, and different examples are dropped each epoch.
    ds = grain.MapDataset.source(self._train).seed(seed).shuffle()
    ds = ds[:steps_per_epoch * global_batch].map(_WithMask())
    if self._augment:
      # Before the process slice, so an element's augmentation depends on its global position
      # only: the union of all processes' batches at a step does not depend on process_count.
      ds = ds.random_map(augment_lib.Augment(flip=self._flip))
    # Process p takes the p-th contiguous block of every global batch: stacked in process order
    # (as jax.make_array_from_process_local_data does), the blocks are exactly the single-process
    # global batch, so the rows and their dropout masks do not depend on process_count.
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    # repeat() after batch(): indices past the first epoch reach shuffle and random_map with
    # the epoch folded in, so each epoch has a new order and new augmentations.
    return self._to_iterator(ds.repeat())

  def eval_batches(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                   split: str | None = None) -> grain.DatasetIterator:
    """Per-process eval batches covering `split` once across processes; padding rows have mask 0."""
    _check_process(process_index, process_count)
    if batch_size <= 0:
      raise UserError(f"The eval batch size must be positive, got {batch_size}; raise train.eval_batch_size.")
    examples = self.examples(split)
    num_batches = self.num_eval_batches(batch_size, process_count, split)
    padding = _padding_like(examples[0])
    # Every process yields num_batches batches (the last ones padded, some possibly all
    # padding) so that collectives inside the eval step never wait on a finished process.
    ds = grain.MapDataset.range(num_batches * batch_size * process_count)
    ds = ds[process_index::process_count].map(_PaddedExample(examples, padding)).batch(batch_size)
    return self._to_iterator(ds)

  def num_eval_batches(self, batch_size: int, process_count: int = 1, split: str | None = None) -> int:
    """Batches each process yields from `eval_batches` with these arguments."""
    return math.ceil(len(self.examples(split)) / (batch_size * process_count))

  def examples(self, split: str | None = None) -> Sequence[Example]:
    """The random-access examples of `split` (default: the eval split), loaded once."""
    split = split or self.info.eval_split
    if split not in self._splits:
      self._splits[split] = self._split_examples(split)
      if not len(self._splits[split]):
        raise UserError(f"Split {split!r} of {self.info.name!r} has no examples at this dataset.seq_len; "
                        "lower dataset.seq_len or use another split.")
    return self._splits[split]

  def _to_iterator(self, ds: grain.MapDataset) -> grain.DatasetIterator:
    iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
    if self._num_workers > 0:
      # grain 0.2.x reads an absl flag when starting workers and raises UnparsedFlagAccessError
      # in programs that do not run absl.app (our CLI uses argparse); grain's defaults are right.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(iter_ds)


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is outside [0, {process_count}); "
                    "pass jax.process_index() and jax.process_count().")
