"""grain pipelines that turn random-access examples into per-process train and eval batches.

Train batches of examples held in memory come from `TrainIterator`, which reads a loop call's
batches in one gather on the caller's thread; records read one by one (TFDS) go through grain's
reader threads or worker processes. Both iterators have the same checkpointable state.

Batches are dicts of numpy arrays:
  image: {"image": float32 [B,H,W,C] in [0,1], "label": int32 [B], "mask": float32 [B]}, and
         with dataset.augment, train batches also carry "augment": float32 [B,4], each image's
         augmentation draws, which the train step applies (data/augment.py)
  text:  {"inputs": int32 [B,L], "targets": int32 [B,L], "mask": float32 [B,L]}
`mask` is 1 for real examples (or scored bytes) and 0 for padding.
"""

from __future__ import annotations

import dataclasses
import math
import sys
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

  @property
  def resident(self) -> bool:
    """Whether the examples are arrays in memory (not records read and decoded one by one)."""
    return self._arrays

  def __getitem__(self, index: int) -> Example:
    if self._arrays:
      image, label = self._records[0][index], self._records[1][index]
    else:
      record = self._records[index]
      image, label = record["image"], record["label"]
    return {"image": np.asarray(image, np.float32) * np.float32(self._scale), "label": np.int32(label)}

  def read_batch(self, indices: np.ndarray) -> Example:
    """The examples at `indices` stacked: one numpy gather for arrays, one batched read for TFDS."""
    if self._arrays:
      images, labels = self._records[0][indices], self._records[1][indices]
    else:
      # One by one: tfds's batched `__getitems__` fails under tfds.testing.mock_data (4.9.x), and
      # decoding, not the read, dominates a TFDS record; grain runs these reads ahead in threads.
      records = [self._records[int(i)] for i in indices]
      images = np.stack([np.asarray(r["image"]) for r in records])
      labels = np.array([r["label"] for r in records])
    # No copies beyond the gather where the arrays are float32 [0,1] already (digits): a copy of a
    # call's images is ~0.3 MB, and large allocations cost page faults with huge pages (runtime.py).
    if self._scale != 1.0:
      images = np.multiply(images, np.float32(self._scale), dtype=np.float32)
    images = images.astype(np.float32, copy=False)
    return {"image": images, "label": labels.astype(np.int32, copy=False)}


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

  resident = True  # One byte array in memory.

  def __getitem__(self, index: int) -> Example:
    start = index * self._seq_len
    chunk = self._tokens[start : start + self._seq_len + 1].astype(np.int32)
    n = len(chunk) - 1
    inputs = np.zeros(self._seq_len, np.int32)
    targets = np.zeros(self._seq_len, np.int32)
    mask = np.zeros(self._seq_len, np.float32)
    inputs[:n], targets[:n], mask[:n] = chunk[:-1], chunk[1:], 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}

  def read_batch(self, indices: np.ndarray) -> Example:
    """The windows at `indices` stacked, gathered from the byte stream in one numpy call."""
    offsets_NxL1 = indices[:, None] * self._seq_len + np.arange(self._seq_len + 1)
    valid_NxL1 = offsets_NxL1 < len(self._tokens)
    chunk_NxL1 = np.where(valid_NxL1, self._tokens[np.minimum(offsets_NxL1, len(self._tokens) - 1)], 0)
    chunk_NxL1 = chunk_NxL1.astype(np.int32)
    # Byte t is scored when its target t+1 exists; padding past the stream's end is 0.
    mask_NxL = valid_NxL1[:, 1:].astype(np.float32)
    return {"inputs": chunk_NxL1[:, :-1] * (mask_NxL > 0), "targets": chunk_NxL1[:, 1:], "mask": mask_NxL}


def read_batch(examples: Sequence[Example], indices: np.ndarray) -> Example:
  """The examples at `indices` as one batch with a mask of 1 (image examples carry no mask of their own)."""
  if hasattr(examples, "read_batch"):
    batch = examples.read_batch(indices)
  else:
    items = [examples[int(i)] for i in indices]
    batch = {k: np.stack([item[k] for item in items]) for k in items[0]} if items else {}
  if "mask" not in batch:
    batch["mask"] = np.ones(len(indices), np.float32)
  return batch


class _TrainBatch:
  """Local step k -> this process's block of global batch k of the epoch-shuffled, augmented stream.

  Epoch e = k // steps_per_epoch is a fresh permutation of the examples seeded by (seed, e), cut
  to whole global batches. Process p takes the p-th contiguous block of every global batch:
  stacked in process order (as jax.make_array_from_process_local_data does), the blocks are
  exactly the single-process global batch. Augmentation draws from (seed, stream position), so
  the union of the processes' batches at a step does not depend on process_count either.
  """

  def __init__(
    self,
    examples: Sequence[Example],
    *,
    seed: int,
    steps_per_epoch: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    augment: bool,
    flip: bool,
  ):
    self._examples, self._seed, self._steps_per_epoch = examples, seed, steps_per_epoch
    self._batch_size, self._process_index, self._process_count = batch_size, process_index, process_count
    self._augment, self._flip = augment, flip
    self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, order); one tuple so threads swap it whole.

  def _order(self, epoch: int) -> np.ndarray:
    cached = self._permutation
    if cached is None or cached[0] != epoch:
      order = np.random.default_rng([self._seed, epoch]).permutation(len(self._examples))
      cached = self._permutation = (epoch, order)
    return cached[1]

  def __call__(self, step: int) -> Example:
    return {k: v[0] for k, v in self.read(np.array([step])).items()}

  def read(self, steps_K: np.ndarray) -> Example:
    """The batches of local steps `steps_K` stacked on a leading axis [K, B, ...], read in one gather."""
    epoch_K, step_in_epoch_K = np.divmod(steps_K.astype(np.int64), self._steps_per_epoch)
    global_batch = self._batch_size * self._process_count
    in_epoch_KxB = (
      step_in_epoch_K[:, None] * global_batch + self._process_index * self._batch_size + np.arange(self._batch_size)
    )
    indices_KxB = np.empty_like(in_epoch_KxB)
    for epoch in np.unique(epoch_K):  # Ascending: a read across an epoch boundary leaves the newer order cached.
      rows = epoch_K == epoch
      indices_KxB[rows] = self._order(int(epoch))[in_epoch_KxB[rows]]
    K, B = indices_KxB.shape
    batch = read_batch(self._examples, indices_KxB.reshape(-1))
    if self._augment:
      positions_N = (epoch_K[:, None] * self._steps_per_epoch * global_batch + in_epoch_KxB).reshape(-1)
      # Only the draws are made here; the train step moves the pixels (augment.apply_to_batch).
      batch[augment_lib.KEY] = augment_lib.draws(self._seed, positions_N, batch["image"].shape[1], self._flip)
    return {k: v.reshape((K, B) + v.shape[1:]) for k, v in batch.items()}


class TrainIterator(grain.DatasetIterator):
  """Train batches of resident examples, read on the calling thread, one step or a call's steps in one gather.

  Its state is grain's prefetching iterator's ({"next_index": local step}), so a checkpoint of
  either resumes the other exactly.
  """

  def __init__(self, batches: _TrainBatch):
    super().__init__()
    self._batches, self._next = batches, 0

  def __next__(self) -> Example:
    return self.take(1, stacked=False)

  def take(self, count: int, stacked: bool = True) -> Example:
    """The next `count` batches stacked on a leading axis [count, B, ...] (or the one batch, unstacked)."""
    batch = self._batches.read(self._next + np.arange(count))
    self._next += count
    return batch if stacked else {k: v[0] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next = int(state["next_index"])


def stack(batches: list[Example]) -> Example:
  """Host batches (or stacks of them) stacked on a new leading axis, key by key."""
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def take(iterator: Any, count: int) -> Example:
  """The next `count` batches of `iterator` stacked on a new leading axis: one read where it can."""
  if isinstance(iterator, TrainIterator):
    return iterator.take(count)
  return stack([next(iterator) for _ in range(count)])


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Batch k of process p: examples (k*B + j)*P + p for j < B; zero rows with mask 0 past the end."""

  examples: Sequence[Example]
  batch_size: int
  process_index: int
  process_count: int

  def __call__(self, k: int) -> Example:
    global_B = (int(k) * self.batch_size + np.arange(self.batch_size)) * self.process_count + self.process_index
    real_B = global_B < len(self.examples)
    batch = read_batch(self.examples, np.where(real_B, global_B, 0))
    # Padding rows are zeros with mask 0, so that a sum over the batch ignores them.
    return {k: np.where(real_B.reshape((-1,) + (1,) * (v.ndim - 1)), v, np.zeros_like(v)) for k, v in batch.items()}


class Dataset:
  """A dataset's info plus per-process train and eval iterators built with grain."""

  def __init__(
    self,
    info: DatasetInfo,
    train: Sequence[Example],
    split_examples: Callable[[str], Sequence[Example]],
    *,
    augment: bool = False,
    flip: bool = False,
    num_workers: int = 0,
  ):
    self.info = info
    self._train = train
    self._split_examples = split_examples
    self._augment = augment and info.kind == "image"
    self._flip = flip
    self._num_workers = num_workers
    self._splits: dict[str, Sequence[Example]] = {}

  @property
  def augments(self) -> bool:
    """Whether train batches carry augmentation draws (the "augment" key)."""
    return self._augment

  def train_iterator(
    self, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
  ) -> grain.DatasetIterator:
    """Infinite per-process train batches, reshuffled each epoch; `get_state`/`set_state` resume exactly."""
    _check_process(process_index, process_count)
    global_batch = batch_size * process_count
    steps_per_epoch = len(self._train) // global_batch
    if batch_size <= 0 or steps_per_epoch == 0:
      raise UserError(
        f"The global train batch ({batch_size} x {process_count} processes) must be between 1 and "
        f"the {len(self._train)} train examples of {self.info.name!r}; lower train.batch_size."
      )
    batches = _TrainBatch(
      self._train,
      seed=seed,
      steps_per_epoch=steps_per_epoch,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      augment=self._augment,
      flip=self._flip,
    )
    if self._num_workers == 0 and getattr(self._train, "resident", False):
      # Resident arrays: a call's batches are one numpy gather of ~10-100 us, cheaper on this thread
      # than handing batches over from grain's threads, which compete with the train step for the cores.
      return TrainIterator(batches)
    # Whole batches are read (and their augmentation drawn) in one numpy call each; grain runs
    # them ahead in threads and checkpoints the step reached (`next_index`), from which resuming is exact.
    return self._to_iterator(grain.MapDataset.range(sys.maxsize).map(batches))

  def eval_batches(
    self, *, batch_size: int, process_index: int = 0, process_count: int = 1, split: str | None = None
  ) -> grain.DatasetIterator:
    """Per-process eval batches covering `split` once across processes; padding rows have mask 0."""
    _check_process(process_index, process_count)
    if batch_size <= 0:
      raise UserError(f"The eval batch size must be positive, got {batch_size}; raise train.eval_batch_size.")
    examples = self.examples(split)
    num_batches = self.num_eval_batches(batch_size, process_count, split)
    # Every process yields num_batches batches (the last ones padded, some possibly all
    # padding) so that collectives inside the eval step never wait on a finished process.
    ds = grain.MapDataset.range(num_batches).map(_EvalBatch(examples, batch_size, process_index, process_count))
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
        raise UserError(
          f"Split {split!r} of {self.info.name!r} has no examples at this dataset.seq_len; "
          "lower dataset.seq_len or use another split."
        )
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
    raise UserError(
      f"process_index {process_index} is outside [0, {process_count}); "
      "pass jax.process_index() and jax.process_count()."
    )
