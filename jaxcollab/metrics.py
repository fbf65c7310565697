"""Metrics out of a run: metrics.jsonl + TensorBoard rows, console progress, run.json, plots, reports.

Everything here writes into the workdir, the unit a collaborator receives, and only process 0 writes
(the callers pass `enabled=False` elsewhere).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import tqdm

from jaxcollab import records, runtime

# tensorboardX's writer imports torch when it is installed, only to accept torch tensors we never
# pass: 1.5-7 s of every run's start on a 2-core CPU. Hide torch while tensorboardX loads.
_TORCH_HIDDEN = "torch" not in sys.modules
if _TORCH_HIDDEN:
  sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError.
try:
  import tensorboardX  # noqa: E402
finally:
  if _TORCH_HIDDEN:
    del sys.modules["torch"]


def _python_value(value: Any) -> Any:
  """A JSON-ready Python scalar from a Python, NumPy or JAX number (other values pass through)."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if hasattr(value, "shape") and np.size(value) == 1:
    return np.asarray(value).item()
  return value


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricWriter:
  """Appends metric rows to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, records.METRICS_FILE)
    tb_dir = os.path.join(workdir, "tensorboard")
    if resume_step > 0:
      # A run killed after its last checkpoint logged rows past it; the resumed run logs them again.
      if os.path.exists(path):
        kept = [r for r in records.read_rows(path) if r.get("step", 0) <= resume_step]
        records.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
      # TensorBoard hides earlier events with step >= purge_step when it reads the new file.
      self._tb = tensorboardX.SummaryWriter(tb_dir, purge_step=resume_step + 1)
    else:
      # A fresh run owns the workdir's logs: stale rows from an older run would mix into its curves.
      for old in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        os.remove(old)
      self._tb = tensorboardX.SummaryWriter(tb_dir)
    self._file = open(path, "w" if resume_step <= 0 else "a")

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    """Logs one row {"step", "split", **values} to both sinks and flushes them."""
    if self._file is None or self._tb is None:  # Not process 0, or closed.
      return
    values = {k: _python_value(v) for k, v in values.items()}
    # json writes floats with repr(), which round-trips exactly.
    self._file.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._file.flush()  # A crash must not lose rows that were already reported.
    for name, value in values.items():
      if _is_number(value):
        self._tb.add_scalar(f"{split}/{name}", value, global_step=int(step))
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both sinks; safe to call twice."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _format_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
  """A tqdm bar on a terminal; plain log lines every `every` steps otherwise (log files, CI)."""

  def __init__(self, total: int, initial: int = 0, every: int = 50, enabled: bool = True):
    self.total, self.every, self.enabled = total, max(int(every), 1), enabled
    self._bar = None
    self._last_step, self._last_time = initial, time.perf_counter()
    # A terminal that reports 0 columns (some IDE consoles) would get an empty bar: plain lines there.
    if enabled and sys.stderr.isatty() and shutil.get_terminal_size((80, 24)).columns >= 20:
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

  def update(self, step: int, values: dict[str, float]) -> None:
    """Moves the bar to `step`, or prints a line if `step` is a multiple of `every` or the last."""
    if not self.enabled or (self._bar is None and step % self.every and step != self.total):
      return
    text = " ".join(f"{k} {float(v):.4f}" for k, v in values.items())
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=False)
      self._bar.update(step - self._bar.n)
      return
    now = time.perf_counter()
    elapsed = now - self._last_time
    rate = (step - self._last_step) / elapsed if elapsed > 0 else float("nan")
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    self._last_step, self._last_time = step, now
    percent = 100 * step // max(self.total, 1)
    line = f"step {step}/{self.total} ({percent}%)"
    line += f" {text}" if text else ""
    line += f" | {rate:.1f} steps/s | ETA {_format_duration(eta)}"
    print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    """Closes the bar (plain lines need no closing)."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _git(source_dir: str, *args: str) -> str | None:
  """Output of `git args` in `source_dir`, or None when git or the checkout is missing."""
  try:
    out = subprocess.run(["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout


def write_run_info(workdir: str, *, config_json: str, mesh_shape: dict[str, int], argv: list[str]) -> None:
  """Writes WORKDIR/run.json: versions, devices, mesh, git commit, command line and start time."""
  source_dir = os.path.dirname(os.path.abspath(__file__))
  commit = _git(source_dir, "rev-parse", "HEAD")
  status = _git(source_dir, "status", "--porcelain") if commit is not None else None
  devices = jax.devices()
  info = {
    "versions": runtime.versions(),
    "devices": {
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "count": len(devices),
      "local_count": jax.local_device_count(),
    },
    "process_count": jax.process_count(),
    "host": socket.gethostname(),  # Written by process 0 only, so this is process 0's host.
    "mesh_shape": {str(k): int(v) for k, v in mesh_shape.items()},
    "git_commit": commit.strip() if commit is not None else None,
    "git_dirty": bool(status.strip()) if status is not None else None,
    "command": " ".join(argv),
    "config_sha256": hashlib.sha256(config_json.encode("utf-8")).hexdigest(),
    "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  os.makedirs(workdir, exist_ok=True)
  records.write_atomic(os.path.join(workdir, records.RUN_FILE), json.dumps(info, indent=2) + "\n")


def check_confusion(confusion: np.ndarray) -> np.ndarray:
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"A confusion matrix must be square [classes, classes]; got shape {confusion.shape}.")
  if np.any(confusion < 0):
    raise ValueError("A confusion matrix holds counts; it has a negative entry.")
  return confusion


def label_names(n: int, class_names: list[str] | None) -> list[str]:
  if class_names is None:
    return [str(i) for i in range(n)]
  if len(class_names) != n:
    raise ValueError(f"Got {len(class_names)} class names for a {n}x{n} confusion matrix.")
  return [str(c) for c in class_names]


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den with 0 where den is 0 (sklearn's zero_division=0)."""
  return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def classification_report(confusion: np.ndarray, class_names: list[str] | None = None) -> dict:
  """Accuracy, per-class precision/recall/F1/support and macro averages from a [C, C] count matrix."""
  confusion = check_confusion(confusion).astype(np.float64)  # rows = true class, columns = predicted.
  names = label_names(confusion.shape[0], class_names)
  tp, predicted, support = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
  precision, recall = _safe_divide(tp, predicted), _safe_divide(tp, support)
  f1 = _safe_divide(2 * precision * recall, precision + recall)
  total = confusion.sum()
  return {
    "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
    "per_class": [
      {"class": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
      for n, p, r, f, s in zip(names, precision, recall, f1, support)
    ],
    "macro_precision": float(precision.mean()),
    "macro_recall": float(recall.mean()),
    "macro_f1": float(f1.mean()),
  }


def format_report(report: dict) -> str:
  """The report as a text table in the layout of sklearn's classification_report."""
  per_class = report["per_class"]
  width = max([len("macro avg")] + [len(c["class"]) for c in per_class])
  lines = [f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
  for c in per_class:
    lines.append(f"{c['class']:>{width}} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} {c['support']:>9d}")
  total = sum(c["support"] for c in per_class)
  macro_p = report.get("macro_precision", float(np.mean([c["precision"] for c in per_class])))
  macro_r = report.get("macro_recall", float(np.mean([c["recall"] for c in per_class])))
  lines += [
    "",
    f"{'accuracy':>{width}} {'':>9} {'':>9} {report['accuracy']:>9.4f} {total:>9d}",
    f"{'macro avg':>{width}} {macro_p:>9.4f} {macro_r:>9.4f} {report['macro_f1']:>9.4f} {total:>9d}",
  ]
  return "\n".join(lines) + "\n"
