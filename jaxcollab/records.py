"""What a workdir records, read back without the training stack: metrics.jsonl rows and run.json.

Readers (`jaxcollab.load`, `inspect`, `compare`, `eval`) use this module alone, so reading a run
imports neither TensorBoard's writer nor matplotlib.
"""

from __future__ import annotations

import json
import logging
import os

from jaxcollab.errors import UserError

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


def read_rows(path: str, skip_bad: bool = False) -> list[dict]:
  """Parsed rows of a jsonl file; a torn last line (process killed mid-write) is dropped.

  A malformed line elsewhere is a UserError naming its number, or skipped with a warning (`skip_bad`).
  """
  with open(path, errors="replace") as f:
    lines = f.read().split("\n")
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
      rows.append(row)
    except ValueError as e:
      if i == last:
        logging.warning("Ignoring an incomplete last line in %s.", path)
      elif skip_bad:
        logging.warning("Skipping line %d of %s: it is not a JSON object (%s).", i + 1, path, e)
      else:
        raise UserError(
          f"Line {i + 1} of {path} is not a JSON object ({e}); fix or delete that line, then rerun."
        ) from None
  return rows


def write_atomic(path: str, text: str) -> None:
  """Replaces `path` in one step, so a crash leaves either the old or the new file, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def read_metrics(workdir: str, skip_bad: bool = False) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl, in the order they were written (`skip_bad`: see `read_rows`)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"No {METRICS_FILE} in {workdir}; check the path, or train a run into it with "
      f"`jaxcollab train --workdir {workdir}`."
    )
  return read_rows(path, skip_bad)
