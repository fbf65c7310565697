"""Reading a checkpoint back for use: `jaxcollab.load`, `--config.init_from`, `jaxcollab inspect`.

Everything here reads finished steps only and works on any device count, whatever mesh saved them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxcollab import bundle, checkpoint, data, models, pytree, records
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import CheckpointError, CorruptCheckpointError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepRef:
  """One finished step: its checkpoints directory, number, and the other steps available."""

  directory: str
  step: int
  steps: tuple[int, ...]

  @property
  def path(self) -> str:
    return os.path.join(self.directory, str(self.step))


def resolve(path: str, step: int | None = None) -> StepRef:
  """A workdir, its checkpoints/ directory or one step directory -> the step to read."""
  if not os.path.exists(path):
    raise CheckpointError(
      f"Checkpoint path {path!r} does not exist; pass a workdir, its checkpoints/ directory or one step directory."
    )
  path = os.path.abspath(path)
  directory = path
  if os.path.isdir(os.path.join(path, "checkpoints")):
    directory = os.path.join(path, "checkpoints")
  elif os.path.basename(path).isdigit() and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
    directory, own = os.path.dirname(path), int(os.path.basename(path))
    if step is not None and step != own:
      raise CheckpointError(f"{path!r} is step {own}, not step {step}; pass its workdir to choose another step.")
    step = own
  steps = checkpoint.finished_steps(directory)
  if not steps:
    raise CheckpointError(
      f"{path!r} holds no finished checkpoint; pass a workdir that `jaxcollab train` wrote "
      "(with a checkpoints/ directory) or one of its step directories."
    )
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise CheckpointError(
      f"Step {step} is not among the checkpoints in {directory} (available: "
      f"{', '.join(map(str, steps))}); pass one of those."
    )
  return StepRef(directory, step, steps)


@contextlib.contextmanager
def _reading(ref: StepRef):
  """Ends a damaged step's error with the steps a reader can pick instead."""
  try:
    yield
  except CorruptCheckpointError as e:
    others = ", ".join(str(s) for s in ref.steps if s != ref.step)
    raise CorruptCheckpointError(
      f"{e}; pick another step with --step ({others})." if others else f"{e}; it is the only step in {ref.directory}."
    ) from e


def read_config(ref: StepRef) -> ConfigDict:
  """The config a step was trained with."""
  config = config_lib.from_json(json.dumps(checkpoint.read_json(ref.path, ref.step, checkpoint.CONFIG)))
  # Older versions saved every model's keys; keep those this model reads.
  return models.portable(models.resolve(config_lib.validate(config), drop_unread=True))


def read_meta(ref: StepRef) -> dict:
  """Step, eval metrics, dataset, mesh, devices and versions saved with a step."""
  return checkpoint.read_json(ref.path, ref.step, checkpoint.META)


def read_state_numpy(ref: StepRef, keys: tuple[str, ...] | None = None, verified: bool = False) -> dict[str, PyTree]:
  """The saved state (or its `keys` subtrees) as numpy arrays, whatever mesh it was saved from.

  The same few orbax calls as the README's recipe for reading a checkpoint without jaxcollab.
  """
  if not verified:
    checkpoint.verify(ref.path, ref.step)
  tree = checkpoint.read_state_metadata(ref.path, ref.step)
  if keys is not None:
    tree = {k: tree[k] for k in keys if k in tree}
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(
      epath.Path(ref.path) / checkpoint.STATE,
      args=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy, partial_restore=keys is not None),
    )
  except Exception as e:  # Checksums passed (or were not asked for): not damage; name the cause.
    raise CheckpointError(
      f"Checkpoint step {ref.step} in {ref.directory} could not be read "
      f"({checkpoint.first_line(e)}); its files are intact, so fix the cause named here."
    ) from e
  finally:
    handler.close()


def load(path: str, step: int | None = None):
  """(model, variables, config) of a saved step or an exported bundle, on this process's default device."""
  if bundle.is_bundle(path):
    loaded = bundle.read(path, step)
    return loaded.model, loaded.variables, loaded.config
  ref = resolve(path, step)
  with _reading(ref):
    checkpoint.verify(ref.path, ref.step)
    config = read_config(ref)
    meta = read_meta(ref)
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["dataset"].items()}
    info = data.DatasetInfo(**fields)
    model = models.build(config, info)
    expected = checkpoint.model_part(jax.eval_shape(lambda: nn.unbox(run_lib.init_variables(model, info, config.seed))))
    checkpoint.check_structure(
      checkpoint.model_part(checkpoint.read_state_metadata(ref.path, ref.step)), expected, ref.path
    )
    variables = jax.device_put(read_state_numpy(ref, keys=("params", "batch_stats"), verified=True))
  return model, variables, config


def open_model(path: str, step: int | None = None) -> bundle.Loaded:
  """A workdir's step or a bundle, with its dataset description and metadata (what `sample`/`predict` need)."""
  if bundle.is_bundle(path):
    return bundle.read(path, step)
  ref = resolve(path, step)
  model, variables, config = load(ref.path)
  meta = read_meta(ref)
  dataset = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["dataset"].items()}
  return bundle.Loaded(model, variables, config, dataset, ref.step, meta)


def init_from(state: run_lib.TrainState, path: str) -> run_lib.TrainState:
  """Copies another run's parameters (and BatchNorm statistics) that match by path and shape; logs the rest."""
  ref = resolve(path)
  with _reading(ref):
    source = read_state_numpy(ref, keys=("params", "batch_stats"))
  flat_source = dict(_flat_leaves(source))
  target = checkpoint.model_part({"params": state.params, "batch_stats": state.batch_stats})
  missing, unexpected, mismatched = checkpoint.structure_diff(source, target)
  kept = sorted(set(missing) | {m.split(" ")[0] for m in mismatched})
  leaves = [
    x if n in kept else jax.device_put(np.asarray(flat_source[n], x.dtype), x.sharding) for n, x in _flat_leaves(target)
  ]
  if len(kept) == len(leaves):
    raise CheckpointError(
      f"--config.init_from={path} shares no parameter (same path and shape) with this model; "
      "point it at a run of the same architecture."
    )
  loaded = jax.tree_util.tree_unflatten(jax.tree.structure(target), leaves)
  log = logging.warning if kept or unexpected else logging.info
  log(
    "init_from %s (step %d): loaded %d of %d arrays; kept the fresh initialisation of %d (%s); ignored %d "
    "source arrays (%s).",
    ref.path,
    ref.step,
    len(leaves) - len(kept),
    len(leaves),
    len(kept),
    checkpoint.listing("missing or reshaped", kept) or "none",
    len(unexpected),
    ", ".join(unexpected[:8]) or "none",
  )
  return state.replace(params=loaded["params"], batch_stats=loaded.get("batch_stats", {}))


def _flat_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  return list(pytree.leaf_paths(tree).items())


def describe(path: str, step: int | None = None) -> dict[str, Any]:
  """What `jaxcollab inspect` shows: steps, config, metadata, metrics and the array tree."""
  ref = resolve(path, step)
  try:
    checkpoint.verify(ref.path, ref.step, contents=False)  # Sizes only: cheap; restoring checks every byte.
    integrity = "complete (file sizes match; contents are checked when restored)"
  except CorruptCheckpointError as e:
    integrity = str(e)
  with _reading(ref):
    tree, config, meta = (
      checkpoint.read_state_metadata(ref.path, ref.step),
      checkpoint.read_json(ref.path, ref.step, checkpoint.CONFIG),
      read_meta(ref),
    )
  arrays: list[dict[str, Any]] = []
  totals: dict[str, dict[str, int]] = {}
  for name, leaf in _flat_leaves(tree):
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    count = int(np.prod(shape, dtype=np.int64))
    arrays.append(
      {"path": name, "shape": list(shape), "dtype": dtype.name, "count": count, "bytes": count * dtype.itemsize}
    )
    total = totals.setdefault(name.split("/")[0], {"arrays": 0, "count": 0, "bytes": 0})
    total["arrays"] += 1
    total["count"] += count
    total["bytes"] += count * dtype.itemsize
  workdir = os.path.dirname(ref.directory)
  path = os.path.join(workdir, records.METRICS_FILE)
  rows = records.read_metrics(workdir, skip_bad=True) if os.path.isfile(path) else []  # inspect: best effort.
  last = {}
  for row in rows:
    last[row.get("split")] = row
  return {
    "directory": ref.directory,
    "steps": list(ref.steps),
    "step": ref.step,
    "config": config,
    "meta": meta,
    "integrity": integrity,
    "arrays": arrays,
    "totals": totals,
    "param_count": totals.get("params", {}).get("count", 0),
    "total_bytes": sum(t["bytes"] for t in totals.values()),
    "metrics": {"at_step": [r for r in rows if r.get("step") == ref.step], "last": list(last.values())},
  }
