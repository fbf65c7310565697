"""Datasets from the TFDS catalog, read through `tfds.data_source` (random access, no TensorFlow).

Nothing here downloads: a dataset must already be built in `data_dir` in the
array_record format; otherwise the user gets one sentence saying how to build it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxcollab.errors import UserError

# lm1b's train split is ~4 GB of sentences; byte-level windows over all of it would not fit
# in host memory, so each text split is read up to this many bytes (tiny_shakespeare is ~1 MB
# and is always read whole). The records are read in order, so the cap is deterministic.
MAX_TEXT_BYTES = 64 * 2**20
_READ_AHEAD = 1024  # records read ahead of the one being joined.


def _build_hint(name: str, data_dir: str) -> str:
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
  return (
    f"TFDS dataset {name!r} is not prepared in {where}; run `tfds build {name} "
    f"--file_format=array_record` on a machine with internet (or copy its directory) "
    f"and pass --config.dataset.data_dir=DIR."
  )


def open_split(name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
  """The random-access records of TFDS `name`/`split`; UserError when it is not built here."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # ~0.3 s; only for TFDS runs.

  directory = data_dir or None
  try:
    # download=False: without it data_source calls download_and_prepare, which on a
    # machine without internet can retry for minutes before failing.
    return tfds.data_source(name, split=split, data_dir=directory, download=False)
  except (
    tfds.core.registered.DatasetNotFoundError,
    AssertionError,
    FileNotFoundError,
    KeyError,
    NotImplementedError,
    ValueError,
  ) as e:
    # tfds reports an unbuilt dataset as an empty `splits` KeyError or as "TFRECORD format
    # not supported"; neither says what to do, so check what is on disk and say that.
    builder = tfds.builder(name, data_dir=directory)
    if not builder.is_prepared():
      raise UserError(_build_hint(name, data_dir or "")) from e
    if split not in builder.info.splits:
      raise UserError(f"TFDS dataset {name!r} has no split {split!r}; use one of {sorted(builder.info.splits)}.") from e
    raise UserError(
      f"TFDS dataset {name!r} in {builder.data_dir} is not in the array_record format that random "
      f"access needs; rebuild it with `tfds build {name} --file_format=array_record`."
    ) from e


def _as_bytes(text: Any) -> bytes:
  # TFDS text features arrive as bytes from array_record files but as str from mock_data
  # and some decoders; numpy scalars wrap either.
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _record_text(record: dict[str, Any]) -> bytes:
  return _as_bytes(record["text"])


def text_bytes(name: str, split: str, data_dir: str, max_bytes: int = MAX_TEXT_BYTES) -> np.ndarray:
  """The UTF-8 bytes of the "text" records of a split joined by newlines, at most `max_bytes`, as uint8."""
  source = open_split(name, split, data_dir)
  # grain reads the records in order on a few threads: lm1b has hundreds of thousands of
  # sentences under the cap, each a separate array_record lookup and decode.
  records = (
    grain.MapDataset.source(source)
    .map(_record_text)
    .to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=_READ_AHEAD))
  )
  pieces, total = [], 0
  for piece in records:
    pieces.append(piece)
    total += len(piece) + 1
    if total >= max_bytes:
      break
  stream = b"\n".join(pieces)[:max_bytes]
  return np.frombuffer(stream, dtype=np.uint8)
