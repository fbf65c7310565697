"""Sweeps: the grid of config values × seeds, each run an ordinary workdir DIR/<cell>/seed_<k>/.

Grid values are parsed and checked exactly like `--config.` overrides, and every cell's config is
validated, before anything trains. Running the same sweep again skips finished runs and resumes
interrupted ones; the seeds of a cell train together through `seeds.train_seeds` where they can.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any

import tqdm

from jaxcollab import checkpoint, compare, models, records, train
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab import seeds as seeds_lib
from jaxcollab import workdir as workdir_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import NonFiniteLossError, UserError

SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"


def parse_seeds(text: str) -> list[int]:
  """'0-4' -> [0..4]; '0,3,7' -> [0, 3, 7]; ranges and lists mix ('0-2,9')."""
  out: list[int] = []
  for part in text.split(","):
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
    if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
      raise UserError(f"--seeds {text!r} does not parse; write a range such as 0-4, a list such as 0,1,2, or both.")
    out += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
  if len(set(out)) != len(out):
    raise UserError(f"--seeds {text!r} names a seed twice; list each seed once.")
  return out


def split_values(text: str) -> list[str]:
  """Splits 'a,b,(1,2)' at the commas outside brackets and quotes -> ['a', 'b', '(1,2)']."""
  values, depth, quote, current = [], 0, "", ""
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(current)
      current = ""
      continue
    current += ch
  values.append(current)
  return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
  """['model.activation=relu,gelu', ...] (from --grid) -> {'model.activation': ['relu', 'gelu'], ...}."""
  grid: dict[str, list[str]] = {}
  for item in items:
    if "=" not in item:
      raise UserError(f"--grid {item!r} has no values; write --grid KEY=VALUE1,VALUE2.")
    key, text = item.split("=", 1)
    key = key.strip().removeprefix("config.")
    if key in grid:
      raise UserError(f"Grid key {key!r} is given twice; list all its values in one --grid {key}=V1,V2.")
    values = split_values(text)
    if not text.strip() or any(not v for v in values):
      raise UserError(
        f"Grid key {key!r} has an empty value in {text!r}; list the values as V1,V2,... "
        "with nothing empty between the commas."
      )
    if len(set(values)) != len(values):
      raise UserError(f"Grid key {key!r} lists a value twice in {text!r}; list each value once.")
    grid[key] = values
  return grid


def _as_text(value: Any) -> str:
  """A value declared in get_sweep() as the text an override would carry."""
  if isinstance(value, bool):
    return str(value).lower()
  return value if isinstance(value, str) else repr(value)


@dataclasses.dataclass
class Cell:
  """One point of the grid: its readable name, its grid values and its validated config (seed unset)."""

  name: str
  values: dict[str, Any]
  config: ConfigDict


@dataclasses.dataclass
class Plan:
  """Everything a sweep will run, checked: cells × seeds, their workdirs, and how to record it."""

  directory: str
  experiment: str
  grid: dict[str, list[str]]
  seeds: list[int]
  overrides: list[str]
  cells: list[Cell]
  sequential: bool = False

  def workdir(self, cell: Cell, seed: int) -> str:
    return os.path.join(self.directory, cell.name, f"seed_{seed}")

  def config(self, cell: Cell, seed: int) -> ConfigDict:
    return config_lib.apply_overrides(cell.config, [f"seed={seed}"])

  @property
  def total(self) -> int:
    return len(self.cells) * len(self.seeds)


def _resolve(config: ConfigDict, overrides: list[str]) -> ConfigDict:
  """What `jaxcollab train` does with its --config overrides: parse, check the shared keys, then the model's."""
  config = config_lib.validate(config_lib.apply_overrides(config, overrides))
  return run_lib.resolve(config, config_lib.override_keys(overrides))


def expand(config: ConfigDict, grid: dict[str, list[str]], overrides: tuple[str, ...] | list[str] = ()) -> list[Cell]:
  """The cartesian product of the grid on top of `config` (+ `overrides`), each cell's config resolved."""
  cells = []
  for combo in itertools.product(*grid.values()):
    items = [f"{k}={v}" for k, v in zip(grid, combo)]
    parsed = config_lib.apply_overrides(config, items)  # Parse errors name the key, before any cell name exists.
    values = {k: config_lib.flat(parsed)[k] for k in grid}
    name = compare.group_name(values) if grid else "base"
    try:
      cell_config = _resolve(config, [*overrides, *items])
    except UserError as e:
      raise type(e)(f"Grid cell {name}: {e}") from e
    cells.append(Cell(name, values, cell_config))
  names = [c.name for c in cells]
  if len(set(names)) != len(names):
    raise UserError("Two grid cells get the same directory name; make the grid values differ in more than punctuation.")
  return cells


def plan(
  experiment: str,
  directory: str,
  grid_items: list[str],
  seeds: str | None,
  overrides: list[str],
  sequential: bool = False,
) -> Plan:
  """Loads the experiment (and its get_sweep()), merges --grid and --seeds, and checks every cell."""
  module, path, arg = config_lib.import_experiment(experiment)
  config = config_lib.load_experiment(path, arg)
  declared = module.get_sweep(arg) if callable(getattr(module, "get_sweep", None)) else {}
  grid = {k: [_as_text(v) for v in vs] for k, vs in declared.get("grid", {}).items()}
  for key, values in grid.items():
    if not values:
      raise UserError(f"get_sweep() in {path!r} gives grid key {key!r} no values; list at least one.")
  grid.update(parse_grid(grid_items))  # The command line replaces a declared key's values.
  keys = [o.split("=", 1)[0].removeprefix("--config.").removeprefix("config.") for o in overrides]
  for key in keys:
    if key in grid:
      raise UserError(f"{key!r} is both a grid key and a --config override; give it in one place.")
  if "seed" in grid:
    raise UserError("Sweep seeds with --seeds (e.g. --seeds 0-4), not as a grid key.")
  seed_list = parse_seeds(seeds) if seeds is not None else list(declared.get("seeds", [config.seed]))
  cells = expand(config, grid, overrides)
  p = Plan(os.path.abspath(directory), experiment, grid, seed_list, list(overrides), cells, sequential)
  for cell in p.cells:
    for seed in p.seeds:
      _check_same_config(p.workdir(cell, seed), p.config(cell, seed))
  return p


def _check_same_config(workdir: str, config: ConfigDict) -> None:
  """What resuming would refuse (workdir.check_resume: keys that change the computation), refused now."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  steps = checkpoint.finished_steps(os.path.join(workdir, "checkpoints"))
  portable = models.portable_keys(config.model.name)
  workdir_lib.check_resume(saved, config, steps[-1] if steps else 0, workdir, portable)


def finished(workdir: str, steps: int | None = None) -> bool:
  """Whether the run in `workdir` wrote its final evaluation (train does that last), at `steps` or later."""
  path = os.path.join(workdir, records.METRICS_FILE)
  if not os.path.exists(path):
    return False
  final = [r["step"] for r in records.read_metrics(workdir) if r.get("split") in compare.FINAL_SPLITS]
  return bool(final) and (steps is None or max(final) >= steps)


def _write_record(p: Plan, status: dict[str, dict]) -> None:
  record = {
    "experiment": p.experiment,
    "grid": p.grid,
    "seeds": p.seeds,
    "overrides": p.overrides,
    "command": " ".join(["jaxcollab", *sys.argv[1:]]) if sys.argv else "",
    "cells": [
      {"name": c.name, "values": {k: compare._json_value(v) for k, v in c.values.items()}}  # pylint: disable=protected-access
      for c in p.cells
    ],
    "runs": status,
  }
  os.makedirs(p.directory, exist_ok=True)
  records.write_atomic(os.path.join(p.directory, SWEEP_FILE), json.dumps(record, indent=2) + "\n")  # pylint: disable=protected-access


@contextlib.contextmanager
def _logged_to(directory: str):
  """Sends a cell's console output to DIR/<cell>/train.log, so the sweep's one progress bar stays readable.

  Beside the cell's workdirs, not in them: a workdir must be empty or jaxcollab's when training opens it.
  """
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, LOG_FILE), "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
    handler = logging.StreamHandler(f)
    logging.getLogger().addHandler(handler)
    try:
      yield f
    finally:
      logging.getLogger().removeHandler(handler)


class _Stopped(Exception):
  """A signal stopped training; every run saved its step."""


def run(p: Plan) -> int:
  """Trains every run of the plan that has not finished; returns 0 if all succeeded, 1 otherwise."""
  status: dict[str, dict] = {}
  todo: list[tuple[Cell, list[int]]] = []
  for cell in p.cells:
    pending = []
    for seed in p.seeds:
      rel = os.path.relpath(p.workdir(cell, seed), p.directory)
      if finished(p.workdir(cell, seed), cell.config.train.steps):
        status[rel] = {"status": "done"}
      else:
        pending.append(seed)
    if pending:
      todo.append((cell, pending))
  _write_record(p, status)
  done_before = sum(s["status"] == "done" for s in status.values())
  out = sys.stderr
  print(
    f"Sweep {p.directory}: {len(p.cells)} cells x {len(p.seeds)} seeds = {p.total} runs; "
    f"{done_before} finished before, {p.total - done_before} to run.",
    file=out,
    flush=True,
  )
  notice = None if p.sequential else seeds_lib.why_not_vmapped(p.cells[0].config)
  if notice:
    print(f"Seeds train one at a time: {notice}.", file=out, flush=True)
  bar = tqdm.tqdm(
    total=p.total,
    initial=done_before,
    unit="run",
    file=out,
    dynamic_ncols=True,
    mininterval=0 if not out.isatty() else 0.1,
  )
  failed = 0
  try:
    for cell, pending in todo:
      bar.set_postfix_str(cell.name)
      t0 = time.perf_counter()
      outcome = _run_cell(p, cell, pending, bar)
      for seed, error in outcome.items():
        rel = os.path.relpath(p.workdir(cell, seed), p.directory)
        status[rel] = {"status": "failed", "error": error} if error else {"status": "done"}
        status[rel]["seconds"] = round(time.perf_counter() - t0, 2)
        if error:
          failed += 1
          bar.write(f"FAILED {rel}: {error} (log: {os.path.join(p.directory, cell.name, LOG_FILE)})", file=out)
      _write_record(p, status)
  except _Stopped:
    bar.close()
    _write_record(p, status)
    print("Stopped; finished runs are kept and interrupted ones saved. Run the same command to resume.", file=out)
    return 1
  bar.close()
  ok = p.total - failed
  print(
    f"Sweep done: {ok}/{p.total} runs succeeded{f', {failed} failed' if failed else ''}; compare them with "
    f"`jaxcollab compare {p.directory}`.",
    file=out,
    flush=True,
  )
  return 1 if failed else 0


def _run_cell(p: Plan, cell: Cell, pending: list[int], bar: tqdm.tqdm) -> dict[int, str | None]:
  """Trains a cell's unfinished seeds (together if possible); seed -> error sentence or None."""
  configs = [p.config(cell, s) for s in pending]
  workdirs = [p.workdir(cell, s) for s in pending]
  cell_dir = os.path.join(p.directory, cell.name)
  if len(pending) > 1 and not p.sequential:
    try:
      with _logged_to(cell_dir):
        results = seeds_lib.train_seeds(configs, workdirs)
    except NonFiniteLossError as e:
      # One seed diverged and stopped them all: train each alone from its last checkpoint, so that
      # only the diverging seeds fail.
      with open(os.path.join(cell_dir, LOG_FILE), "a") as f:
        print(f"{e} Training these seeds one at a time.", file=f)
      results = None
    except Exception as e:  # noqa: BLE001  # One cell's failure must not stop the sweep.
      with open(os.path.join(cell_dir, LOG_FILE), "a") as f:
        traceback.print_exc(file=f)
      bar.update(len(pending))
      return {s: _sentence(e) for s in pending}
    if results == []:
      raise _Stopped()
    if results is not None:
      bar.update(len(pending))
      return {s: None for s in pending}
  outcome: dict[int, str | None] = {}
  for seed, config, workdir in zip(pending, configs, workdirs):
    try:
      with _logged_to(cell_dir):
        result = train.train_and_evaluate(config, workdir)
    except Exception as e:  # noqa: BLE001
      with open(os.path.join(cell_dir, LOG_FILE), "a") as f:
        traceback.print_exc(file=f)
      outcome[seed] = _sentence(e)
    else:
      if not result:
        raise _Stopped()
      outcome[seed] = None
    bar.update(1)
  return outcome


def _sentence(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def sweep(
  experiment: str,
  directory: str,
  grid_items: list[str],
  seeds: str | None = None,
  overrides: list[str] | None = None,
  sequential: bool = False,
) -> int:
  """`jaxcollab sweep`: plans (every check before training) and runs; returns the exit code."""
  return run(plan(experiment, directory, grid_items, seeds, overrides or [], sequential))
