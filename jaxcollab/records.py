"""What a workdir records, read back without the training stack: metrics.jsonl rows and run.json.

Readers (`jaxcollab.load`, `inspect`, `compare`, `eval`) use this module alone, so reading a run
imports neither TensorBoard's writer nor matplotlib.
"""

from __future__ import annotations

import json
import logging
import os

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


def read_rows(path: str) -> list[dict]:
  """Parsed rows of a jsonl file; a torn last line (process killed mid-write) is dropped."""
  with open(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        logging.warning("Ignoring an incomplete last line in %s.", path)
        break
      raise ValueError(f"Line {i + 1} of {path} is not valid JSON ({e}); fix or remove that line.") from e
  return rows


def write_atomic(path: str, text: str) -> None:
  """Replaces `path` in one step, so a crash leaves either the old or the new file, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl, in the order they were written."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No {METRICS_FILE} in {workdir}; check the path, or train a run into it with "
        f"`jaxcollab train --workdir {workdir}`."
    )
  return read_rows(path)


