"""Metrics out of a run: metrics.jsonl + TensorBoard rows, console progress, run.json, plots, reports.

Everything here writes into the workdir, the unit a collaborator receives, and only process 0 writes
(the callers pass `enabled=False` elsewhere).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Headless: runs on clusters and CI without a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm  # pylint: disable=g-import-not-at-top,wrong-import-position

# tensorboardX's writer imports torch when it is installed, only to accept torch tensors we never
# pass: 1.5-7 s of every run's start on a 2-core CPU. Hide torch while tensorboardX loads.
_TORCH_HIDDEN = "torch" not in sys.modules
if _TORCH_HIDDEN:
  sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError.
try:
  import tensorboardX  # pylint: disable=g-import-not-at-top,wrong-import-position
finally:
  if _TORCH_HIDDEN:
    del sys.modules["torch"]

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
# Curves appear in this order; any other metric follows, in the order it first appears.
_METRIC_ORDER = ("loss", "accuracy", "perplexity", "bits_per_byte", "learning_rate", "grad_norm")


def _python_value(value: Any) -> Any:
  """A JSON-ready Python scalar from a Python, NumPy or JAX number (other values pass through)."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if hasattr(value, "shape") and np.size(value) == 1:
    return np.asarray(value).item()
  return value


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_rows(path: str) -> list[dict]:
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


def _write_atomic(path: str, text: str) -> None:
  """Replaces `path` in one step, so a crash leaves either the old or the new file, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class MetricWriter:
  """Appends metric rows to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    tb_dir = os.path.join(workdir, "tensorboard")
    if resume_step > 0:
      # A run killed after its last checkpoint logged rows past it; the resumed run logs them again.
      if os.path.exists(path):
        kept = [r for r in _read_rows(path) if r.get("step", 0) <= resume_step]
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
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
    if not self.enabled:
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
    if enabled and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

  def update(self, step: int, values: dict[str, float]) -> None:
    """Moves the bar to `step`, or prints a line if `step` is a multiple of `every` or the last."""
    if not self.enabled:
      return
    text = " ".join(f"{k} {float(v):.4f}" for k, v in values.items())
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=False)
      self._bar.update(step - self._bar.n)
      return
    if step % self.every and step != self.total:
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


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(source_dir: str, *args: str) -> str | None:
  """Output of `git args` in `source_dir`, or None when git or the checkout is missing."""
  try:
    out = subprocess.run(["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout


def write_run_info(workdir: str, *, config_json: str, mesh_shape: dict[str, int], argv: list[str]) -> None:
  """Writes WORKDIR/run.json: versions, devices, mesh, git commit, command line and start time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxcollab  # pylint: disable=g-import-not-at-top

  source_dir = os.path.dirname(os.path.abspath(jaxcollab.__file__))
  commit = _git(source_dir, "rev-parse", "HEAD")
  status = _git(source_dir, "status", "--porcelain") if commit is not None else None
  devices = jax.devices()
  info = {
      "versions": {
          "jaxcollab": jaxcollab.__version__,
          **{name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                                               "grain", "numpy")},
          "python": platform.python_version(),
      },
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
  _write_atomic(os.path.join(workdir, RUN_FILE), json.dumps(info, indent=2) + "\n")


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl, in the order they were written."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No {METRICS_FILE} in {workdir}; check the path, or train a run into it with "
        f"`jaxcollab train --workdir {workdir}`."
    )
  return _read_rows(path)


def _metric_names(rows: list[dict]) -> list[str]:
  seen = []
  for row in rows:
    for k, v in row.items():
      if k not in ("step", "split") and k not in seen and _is_number(v):
        seen.append(k)
  return [m for m in _METRIC_ORDER if m in seen] + [m for m in seen if m not in _METRIC_ORDER]


def plot_curves(rows: list[dict], path: str) -> None:
  """Writes a PNG with one subplot per metric, one line per split, against the step."""
  names = _metric_names(rows)
  ncols = min(3, max(len(names), 1))
  nrows = max(-(-len(names) // ncols), 1)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
  if not names:
    axes[0, 0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
  splits = list(dict.fromkeys(row.get("split", "?") for row in rows))
  for ax, name in zip(axes.flat, names):
    for split in splits:
      points = sorted((r["step"], r[name]) for r in rows if r.get("split", "?") == split and _is_number(r.get(name)))
      if points:
        steps, values = zip(*points)
        # Markers keep eval/test series visible when they hold only one or two points.
        ax.plot(steps, values, label=split, marker="o" if len(points) < 20 else None, markersize=3)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  for ax in list(axes.flat)[max(len(names), 1):]:
    ax.axis("off")
  fig.tight_layout()
  _save(fig, path)


def _save(fig: Any, path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)  # pyplot keeps every open figure alive otherwise.


def _check_confusion(confusion: np.ndarray) -> np.ndarray:
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"A confusion matrix must be square [classes, classes]; got shape {confusion.shape}.")
  if np.any(confusion < 0):
    raise ValueError("A confusion matrix holds counts; it has a negative entry.")
  return confusion


def _class_names(n: int, class_names: list[str] | None) -> list[str]:
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
  confusion = _check_confusion(confusion).astype(np.float64)  # rows = true class, columns = predicted.
  names = _class_names(confusion.shape[0], class_names)
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
    lines.append(f"{c['class']:>{width}} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} "
                 f"{c['support']:>9d}")
  total = sum(c["support"] for c in per_class)
  macro_p = report.get("macro_precision", float(np.mean([c["precision"] for c in per_class])))
  macro_r = report.get("macro_recall", float(np.mean([c["recall"] for c in per_class])))
  lines += [
      "",
      f"{'accuracy':>{width}} {'':>9} {'':>9} {report['accuracy']:>9.4f} {total:>9d}",
      f"{'macro avg':>{width}} {macro_p:>9.4f} {macro_r:>9.4f} {report['macro_f1']:>9.4f} {total:>9d}",
  ]
  return "\n".join(lines) + "\n"


def plot_confusion(confusion: np.ndarray, path: str, class_names: list[str] | None = None,
                   title: str = "") -> None:
  """Writes a PNG heat map of a [C, C] count matrix (rows true, columns predicted), counts annotated."""
  confusion = _check_confusion(confusion)
  n = confusion.shape[0]
  names = _class_names(n, class_names)
  size = min(max(4.0, 0.5 * n + 2), 20.0)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  image = ax.imshow(confusion, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(n), labels=names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right")
  ax.set_yticks(range(n), labels=names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  # Past ~40 classes the numbers overlap into noise; the colours still tell the story.
  if n <= 40:
    threshold = confusion.max() / 2
    for i in range(n):
      for j in range(n):
        count = confusion[i, j]
        label = f"{int(count)}" if float(count).is_integer() else f"{count:.3g}"
        ax.text(j, i, label, ha="center", va="center", fontsize=8,
                color="white" if confusion[i, j] > threshold else "black")
  fig.tight_layout()
  _save(fig, path)
