"""Comparing runs: read workdirs back, group them by the config keys that differ, test the differences.

Seeds are pooled within a group. For each group: mean ± std of the final eval metrics, n, a 95%
confidence interval (Student's t), and Welch's t-test against a baseline group (scipy); written as
comparison.md/.csv/.json and PNGs (curves with min-max bands over seeds, bars with CIs).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import re
from typing import Any

import numpy as np
from scipy import stats

from jaxcollab import checkpoint, data, plots, probe, records, reload
from jaxcollab.errors import UserError

FINAL_SPLITS = ("test", "eval_final")
# The metric a comparison ranks by when --metric is not given, and its direction.
DEFAULT_METRIC = {"image": ("accuracy", "max"), "text": ("bits_per_byte", "min")}
MAXIMIZED = ("accuracy",)
IGNORED_KEYS = ("seed",)  # Pooled over: what a group averages.
CONFIDENCE = 0.95


# ---- Names of groups (and of sweep cells, which are groups by construction) -----------------------


def short_keys(keys: list[str]) -> dict[str, str]:
  """Each dotted key's last part ('model.activation' -> 'activation', 'loss.name' -> 'loss'); whole where two clash."""
  parts = [k.split(".") for k in keys]
  last = [p[-2] if p[-1] == "name" and len(p) > 1 else p[-1] for p in parts]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def format_value(value: Any) -> str:
  """A config value as it reads in a name: tuples joined by 'x', bools lower-case, no path separators."""
  if isinstance(value, (tuple, list)):
    text = "x".join(format_value(v) for v in value)
  elif isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, float):
    text = f"{value:g}"
  else:
    text = str(value)
  return re.sub(r"[\s/\\:]+", "-", text) or "''"


def group_name(values: dict[str, Any]) -> str:
  """'activation=relu,name=cross_entropy'-style name of a set of key values; 'all' when there are none."""
  short = short_keys(list(values))
  return ",".join(f"{short[k]}={format_value(v)}" for k, v in values.items()) or "all"


# ---- Reading runs back -------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
  """One workdir as compare sees it."""

  workdir: str
  config: dict[str, Any]  # Flattened: 'model.activation' -> 'relu'.
  rows: list[dict]
  final: dict[str, float]  # The final evaluation (test / eval_final row, else the last eval row).
  wall_s: float | None
  params: int | None

  @property
  def kind(self) -> str:
    return data.DATASETS[self.config["dataset.name"]].kind if self.config["dataset.name"] in data.DATASETS else "?"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
  return out


def find_workdirs(paths: list[str]) -> list[str]:
  """Every workdir (a directory with config.json and metrics.jsonl) at or under `paths`, sorted."""
  found = []
  for path in paths:
    if not os.path.isdir(path):
      raise UserError(f"{path!r} is not a directory; pass workdirs or sweep directories to compare.")
    for root, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard", "plots"))
      if "config.json" in files and records.METRICS_FILE in files:
        found.append(os.path.normpath(root))
  if not found:
    raise UserError(
      f"No runs under {', '.join(paths)} (no directory with config.json and metrics.jsonl); "
      "pass workdirs that `jaxcollab train` or `jaxcollab sweep` wrote."
    )
  return sorted(dict.fromkeys(found))


def grid_keys(paths: list[str]) -> list[str]:
  """The grid keys of the sweeps at or above `paths` (their sweep.json), in grid order."""
  keys = []
  for path in paths:
    here = os.path.abspath(path)
    for directory in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
      file = os.path.join(directory, "sweep.json")
      if os.path.isfile(file):
        with open(file) as f:
          keys += [k for k in json.load(f).get("grid", {}) if k not in keys]
        break
  return keys


def _wall_seconds(workdir: str) -> float | None:
  """From run.json's start to the last metrics row written (the newest training segment)."""
  try:
    with open(os.path.join(workdir, records.RUN_FILE)) as f:
      start = datetime.datetime.fromisoformat(json.load(f)["start_time"]).timestamp()
  except (OSError, KeyError, ValueError):
    return None
  return max(os.path.getmtime(os.path.join(workdir, records.METRICS_FILE)) - start, 0.0)


def _param_count(workdir: str) -> int | None:
  """Parameters in the newest checkpoint, from its metadata (no array is read)."""
  try:
    ref = reload.resolve(workdir)
    tree = checkpoint.read_state_metadata(ref.path, ref.step)
  except (UserError, OSError):
    return None
  return int(sum(math.prod(s) for s in checkpoint.leaf_shapes(tree.get("params", {})).values()))


def read_run(workdir: str, with_params: bool = True) -> RunRecord:
  """A workdir's flattened config, metric rows, final evaluation, wall time and parameter count."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = _flatten(json.load(f))
  rows = records.read_metrics(workdir)
  finals = [r for r in rows if r.get("split") in FINAL_SPLITS] or [r for r in rows if r.get("split") == "eval"]
  final = {k: v for k, v in finals[-1].items() if k not in ("step", "split")} if finals else {}
  return RunRecord(workdir, config, rows, final, _wall_seconds(workdir), _param_count(workdir) if with_params else None)


# ---- Grouping and statistics -------------------------------------------------------------------


@dataclasses.dataclass
class Group:
  """Runs that share every config key except the pooled ones."""

  name: str
  values: dict[str, Any]  # The differing keys' values.
  runs: list[RunRecord]

  def finals(self, metric: str) -> np.ndarray:
    return np.array([r.final[metric] for r in self.runs if metric in r.final], np.float64)


def group_runs(runs: list[RunRecord], key_order: list[str] | None = None) -> list[Group]:
  """Groups by the config keys whose values differ between runs (seeds pooled), in first-seen order.

  Keys in `key_order` (a sweep's grid) come first in that order, so that groups read like sweep cells.
  """
  order = key_order or []
  keys = sorted({k for r in runs for k in r.config}, key=lambda k: (order.index(k) if k in order else len(order), k))
  # A key that only some runs have (another model's field) but with one value says nothing the
  # model name does not: it differs only where its value does.
  differing = [k for k in keys if k not in IGNORED_KEYS and len({repr(r.config[k]) for r in runs if k in r.config}) > 1]
  groups: dict[str, Group] = {}
  for r in runs:
    values = {k: r.config.get(k) for k in differing}
    name = group_name(values)
    groups.setdefault(name, Group(name, values, [])).runs.append(r)
  return list(groups.values())


def summary(x: np.ndarray) -> dict[str, float]:
  """n, mean, sample std and the 95% Student-t confidence interval of the mean (NaN where n < 2)."""
  n = len(x)
  mean = float(np.mean(x)) if n else math.nan
  std = float(np.std(x, ddof=1)) if n > 1 else math.nan
  half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
  return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def welch_p(x: np.ndarray, y: np.ndarray) -> float:
  """Two-sided p-value of Welch's t-test (unequal variances); NaN when either side has < 2 runs."""
  if len(x) < 2 or len(y) < 2:
    return math.nan
  return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def _best_step(run: RunRecord, metric: str, mode: str) -> int | None:
  points = [(r[metric], r["step"]) for r in run.rows if r.get("split") == "eval" and metric in r]
  if not points:
    return None
  pick = max if mode == "max" else min
  return pick(points, key=lambda p: p[0])[1]


@dataclasses.dataclass
class Comparison:
  """The table compare prints and writes: one row per group, sorted best first."""

  metric: str
  mode: str
  baseline: str
  keys: list[str]  # The config keys that differ between groups.
  rows: list[dict[str, Any]]
  groups: list[Group]


def compare_runs(
  runs: list[RunRecord],
  metric: str | None = None,
  mode: str | None = None,
  baseline: str | None = None,
  key_order: list[str] | None = None,
) -> Comparison:
  """Groups `runs`, summarises every final metric per group and tests each group against the baseline."""
  kinds = sorted({r.kind for r in runs})
  if len(kinds) > 1:
    raise UserError(
      "These runs are of different tasks (image classifiers and language models); compare each task's runs separately."
    )
  default_metric, _ = DEFAULT_METRIC.get(kinds[0], ("loss", "min"))
  metric = metric or default_metric
  available = sorted({k for r in runs for k, v in r.final.items() if isinstance(v, (int, float))})
  if metric not in available:
    raise UserError(f"No run has a final {metric!r}; choose --metric from {', '.join(available) or 'nothing'}.")
  mode = mode or ("max" if metric in MAXIMIZED else "min")
  groups = group_runs(runs, key_order)
  groups.sort(key=lambda g: summary(g.finals(metric))["mean"], reverse=mode == "max")
  names = [g.name for g in groups]
  baseline = baseline or names[0]
  if baseline not in names:
    raise UserError(f"--baseline {baseline!r} names no group; choose one of {', '.join(names)}.")
  base = groups[names.index(baseline)].finals(metric)
  rows = []
  for g in groups:
    row: dict[str, Any] = {"group": g.name, **{k: v for k, v in g.values.items()}}
    s = summary(g.finals(metric))
    row.update(
      {
        "n": s["n"],
        f"{metric}_mean": s["mean"],
        f"{metric}_std": s["std"],
        f"{metric}_ci_low": s["ci_low"],
        f"{metric}_ci_high": s["ci_high"],
        "p_vs_baseline": math.nan if g.name == baseline else welch_p(g.finals(metric), base),
      }
    )
    for other in available:
      if other != metric:
        row[f"{other}_mean"] = summary(g.finals(other))["mean"]
    steps = [b for b in (_best_step(r, metric, mode) for r in g.runs) if b is not None]
    row["best_step"] = int(np.median(steps)) if steps else None
    walls = [r.wall_s for r in g.runs if r.wall_s is not None]
    row["wall_s"] = float(np.mean(walls)) if walls else None
    row["params"] = g.runs[0].params
    rows.append(row)
  keys = list(groups[0].values)
  return Comparison(metric, mode, baseline, keys, rows, groups)


# ---- Output ------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  if isinstance(x, int):
    return f"{x:,}"
  return str(x)


def _p_text(p: float) -> str:
  if math.isnan(p):
    return "–"
  return f"{p:.2g}" + (" *" if p < 0.05 else "")


def markdown(c: Comparison) -> str:
  """The comparison as a Markdown table (also what compare prints)."""
  m = c.metric
  others = [k.removesuffix("_mean") for k in c.rows[0] if k.endswith("_mean") and not k.startswith(m + "_")]
  head = ["group", "n", f"{m} mean ± std", "95% CI", f"p vs {c.baseline}"] + others + ["best step", "wall s", "params"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in c.rows:
    cells = [
      r["group"],
      str(r["n"]),
      f"{_fmt(r[m + '_mean'])} ± {_fmt(r[m + '_std'])}",
      f"[{_fmt(r[m + '_ci_low'])}, {_fmt(r[m + '_ci_high'])}]",
      _p_text(r["p_vs_baseline"]),
    ]
    cells += [_fmt(r[o + "_mean"]) for o in others]
    cells += [_fmt(r["best_step"]), _fmt(r["wall_s"], 1), _fmt(r["params"])]
    lines.append("| " + " | ".join(cells) + " |")
  note = (
    f"\nSorted by final {m} ({c.mode} is best); p: Welch's t-test against {c.baseline} "
    "(two-sided, * p < 0.05); CI: Student's t over seeds.\n"
  )
  return "\n".join(lines) + "\n" + note


def _json_value(x: Any) -> Any:
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, tuple):
    return list(x)
  return x


def write(c: Comparison, out: str) -> dict[str, str]:
  """Writes comparison.md/.csv/.json and the PNGs into `out`; returns their paths by name."""
  os.makedirs(out, exist_ok=True)
  paths = {ext: os.path.join(out, f"comparison.{ext}") for ext in ("md", "csv", "json")}
  with open(paths["md"], "w") as f:
    f.write(markdown(c))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(c.rows[0]))
  writer.writeheader()
  writer.writerows([{k: _json_value(v) for k, v in r.items()} for r in c.rows])
  with open(paths["csv"], "w") as f:
    f.write(buf.getvalue())
  doc = {
    "metric": c.metric,
    "mode": c.mode,
    "baseline": c.baseline,
    "keys": c.keys,
    "groups": [
      {
        **{k: _json_value(v) for k, v in r.items()},
        "workdirs": [x.workdir for x in g.runs],
        "finals": [x.final.get(c.metric) for x in g.runs],
      }
      for r, g in zip(c.rows, c.groups)
    ],
  }
  with open(paths["json"], "w") as f:
    json.dump(doc, f, indent=2)
  paths["curves"] = os.path.join(out, "curves.png")
  plot_curves(c, paths["curves"])
  paths["bars"] = os.path.join(out, "bars.png")
  plot_bars(c, paths["bars"])
  return paths


def plot_curves(c: Comparison, path: str) -> None:
  """Eval metric, eval loss and train loss against step: mean line and min-max band per group."""
  panels = list(dict.fromkeys([("eval", c.metric), ("eval", "loss"), ("train", "loss")]))
  plots.plot_group_curves({g.name: [r.rows for r in g.runs] for g in c.groups}, panels, path)


def plot_bars(c: Comparison, path: str) -> None:
  """Final metric per group: mean with its 95% confidence interval, seeds as dots."""
  m = c.metric
  intervals = {r["group"]: (r[m + "_mean"], r[m + "_ci_low"], r[m + "_ci_high"]) for r in c.rows}
  plots.plot_group_bars(intervals, {g.name: g.finals(m) for g in c.groups}, f"final {m}", path)


# ---- Activation statistics per group ------------------------------------------------------------


def activation_rows(c: Comparison) -> list[dict[str, Any]]:
  """Per group and layer: each statistic of `probe.STATS` averaged over the group's runs."""
  rows = []
  for g in c.groups:
    per_run = [probe.probe_run(r.workdir)["layers"] for r in g.runs]
    for layer in per_run[0]:
      values = {s: [run[layer][s] for run in per_run if layer in run] for s in probe.STATS}
      rows.append(
        {
          "group": g.name,
          "layer": layer,
          **{s: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for s, v in values.items()},
        }
      )
  return rows


def activations_markdown(rows: list[dict[str, Any]]) -> str:
  head = ["group", "layer", *probe.STATS]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in rows:
    lines.append("| " + " | ".join([r["group"], r["layer"]] + [_fmt(r[s]) for s in probe.STATS]) + " |")
  return "\n".join(lines) + (
    f"\n\nMeans over seeds on the first {probe.PROBE_SIZE} eval examples; zero_frac: "
    "exact zeros (dead ReLUs); saturated_frac: |tanh| > 0.99, sigmoid < 0.01 or > 0.99; "
    "grad_norm: of the probe loss w.r.t. that layer's parameters.\n"
  )


def plot_activations(rows: list[dict[str, Any]], path: str) -> None:
  """One panel per statistic: its value per layer, one line per group."""
  plots.plot_layer_stats(rows, probe.STATS, path)


def compare(
  paths: list[str],
  metric: str | None = None,
  mode: str | None = None,
  baseline: str | None = None,
  out: str | None = None,
  activations: bool = False,
) -> tuple[Comparison, dict[str, str]]:
  """`jaxcollab compare`: reads the runs under `paths`, writes the comparison into `out`."""
  if mode not in (None, "max", "min"):
    raise UserError(f"--mode must be max or min, got {mode!r}.")
  runs = [read_run(w) for w in find_workdirs(paths)]
  c = compare_runs(runs, metric, mode, baseline, grid_keys(paths))
  out = out or (paths[0] if len(paths) == 1 else os.path.commonpath([os.path.abspath(p) for p in paths]))
  paths_out = write(c, out)
  if activations:
    rows = activation_rows(c)
    paths_out["activations"] = os.path.join(out, "activations.md")
    with open(paths_out["activations"], "w") as f:
      f.write(activations_markdown(rows))
    paths_out["activations_png"] = os.path.join(out, "activations.png")
    plot_activations(rows, paths_out["activations_png"])
  return c, paths_out
