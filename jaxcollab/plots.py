"""PNG figures of a run: training curves and confusion matrices.

matplotlib through `matplotlib.figure.Figure`, never pyplot: no global backend is switched and no
figure outlives its function, so plotting is safe in notebooks, threads and headless machines.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxcollab import metrics

if TYPE_CHECKING:
  from matplotlib.figure import Figure

# Curves appear in this order; any other metric follows, in the order it first appears.
_METRIC_ORDER = ("loss", "accuracy", "perplexity", "bits_per_byte", "learning_rate", "grad_norm")


def figure(**kwargs: Any) -> Figure:
  """A new matplotlib Figure; matplotlib loads at the first plot, not with this module.

  Importing it took 0.2-0.25 s of every `jaxcollab train` start on a 2-core CPU, before the first
  step, for curves drawn only at the end.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  return Figure(**kwargs)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


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
  fig = figure(figsize=(4.5 * ncols, 3.2 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  if not names:
    axes[0, 0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
  splits = list(dict.fromkeys(row.get("split", "?") for row in rows))
  # One colour per split in every panel, so "eval" is the same colour in each.
  colors = {split: f"C{i}" for i, split in enumerate(splits)}
  for ax, name in zip(axes.flat, names):
    for split in splits:
      points = sorted((r["step"], r[name]) for r in rows if r.get("split", "?") == split and _is_number(r.get(name)))
      if points:
        steps, values = zip(*points)
        # Markers keep eval/test series visible when they hold only one or two points.
        ax.plot(steps, values, label=split, color=colors[split], marker="o" if len(points) < 20 else None, markersize=3)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  for ax in list(axes.flat)[max(len(names), 1) :]:
    ax.axis("off")
  fig.tight_layout()
  save(fig, path)


def save(fig: Figure, path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fig.savefig(path, dpi=100)


def plot_confusion(confusion: np.ndarray, path: str, class_names: list[str] | None = None, title: str = "") -> None:
  """Writes a PNG heat map of a [C, C] count matrix (rows true, columns predicted), counts annotated."""
  confusion = metrics.check_confusion(confusion)
  n = confusion.shape[0]
  names = metrics.label_names(n, class_names)
  size = min(max(4.0, 0.5 * n + 2), 20.0)
  fig = figure(figsize=(size + 1, size))
  ax = fig.subplots()
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
        ax.text(
          j, i, label, ha="center", va="center", fontsize=8, color="white" if confusion[i, j] > threshold else "black"
        )
  fig.tight_layout()
  save(fig, path)
