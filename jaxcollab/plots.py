"""PNG figures: a run's training curves and confusion matrix, and the curves and bars comparing groups of runs.

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


# ---- Groups of runs (jaxcollab compare) -------------------------------------------------------


def colors(n: int) -> list:
  """n distinct colours, one per group."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top  # As in `figure`.

  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _band(runs: list[list[dict]], split: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
  """Steps that every run logged, and the [runs, steps] values there."""
  series = [{r["step"]: r[metric] for r in rows if r.get("split") == split and metric in r} for rows in runs]
  steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
  if not steps:
    return None
  return np.array(steps), np.array([[s[t] for t in steps] for s in series], np.float64)


def plot_group_curves(groups: dict[str, list[list[dict]]], panels: list[tuple[str, str]], path: str) -> None:
  """One panel per (split, metric); per group (name: its runs' metric rows), the mean and a min-max band."""
  fig = figure(figsize=(5.2 * len(panels), 4.2))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (split, metric) in zip(axes, panels):
    for (name, runs), color in zip(groups.items(), colors(len(groups))):
      band = _band(runs, split, metric)
      if band is None:
        continue
      steps, values = band
      ax.plot(steps, values.mean(0), color=color, label=name, lw=1.2)
      ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.18, lw=0)
    ax.set_title(f"{split} {metric}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if metric == "loss":
      ax.set_yscale("log")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside right center", fontsize="x-small")
  fig.set_layout_engine("constrained")
  save(fig, path)


def plot_group_bars(
  intervals: dict[str, tuple[float, float, float]], seeds: dict[str, np.ndarray], label: str, path: str
) -> None:
  """Per group: a bar at the mean with its (low, high) interval, and each seed's value as a dot."""
  names = list(intervals)
  fig = figure(figsize=(max(5.0, 0.45 * len(names) + 2), 4.5))
  ax = fig.subplots()
  x = np.arange(len(names))
  means, low, high = (np.array([intervals[n][i] for n in names]) for i in range(3))
  err = np.nan_to_num(np.stack([means - low, high - means]))
  ax.bar(x, means, yerr=err, capsize=3, color=colors(len(names)), alpha=0.75)
  for i, name in enumerate(names):
    values = seeds.get(name, np.zeros(0))
    ax.plot(np.full(len(values), i), values, "k.", ms=3)
  ax.set_xticks(x, names, rotation=60, ha="right", fontsize="x-small")
  ax.set_ylabel(label)
  finite = np.concatenate([*seeds.values(), low[np.isfinite(low)], high[np.isfinite(high)]])
  if finite.size:
    span = finite.max() - finite.min()
    ax.set_ylim(finite.min() - 0.1 * span - 1e-9, finite.max() + 0.1 * span + 1e-9)
  ax.set_title(f"{label}: mean, 95% CI, seeds")
  ax.grid(alpha=0.3, axis="y")
  fig.set_layout_engine("constrained")
  save(fig, path)


def plot_layer_stats(rows: list[dict[str, Any]], stats: tuple[str, ...], path: str) -> None:
  """One panel per statistic: its value per layer, one line per group (rows: group, layer, *stats)."""
  groups = list(dict.fromkeys(r["group"] for r in rows))
  layers = list(dict.fromkeys(r["layer"] for r in rows))
  fig = figure(figsize=(4.2 * len(stats), 4.0))
  axes = fig.subplots(1, len(stats), squeeze=False)[0]
  for ax, stat in zip(axes, stats):
    for g, color in zip(groups, colors(len(groups))):
      points = {r["layer"]: r[stat] for r in rows if r["group"] == g}
      ax.plot(
        range(len(layers)), [points.get(layer, np.nan) for layer in layers], "o-", color=color, label=g, ms=3, lw=1
      )
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize="x-small")
    ax.set_title(stat)
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside right center", fontsize="x-small")
  fig.set_layout_engine("constrained")
  save(fig, path)
