"""Checkpoints: orbax saving, exact resume, strict reloading and inspection of a workdir.

A step directory `WORKDIR/checkpoints/<step>/` describes itself:
  state/   the train state as a plain pytree {step, params, opt_state, [batch_stats], rng}
  data/    the grain iterator position, one JSON file per process (grain's own orbax handler)
  config/  the resolved config (JSON, file `metadata`)
  meta/    step, eval metrics at that step, dataset info and library versions (JSON)
orbax writes every step into a temporary directory and renames it when complete, so a process
killed at any moment leaves only finished steps visible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcollab import config as config_lib
from jaxcollab.config import ConfigDict, UserError

PyTree = Any
STATE, DATA, CONFIG, META = "state", "data", "config", "meta"


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or does not fit the model; finished steps are left untouched."""


def state_tree(state) -> dict[str, PyTree]:
  """The saved pytree of a TrainState: plain containers only, readable without jaxcollab."""
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  if state.batch_stats:  # orbax cannot store an empty subtree; models without BatchNorm have none.
    tree["batch_stats"] = state.batch_stats
  return tree


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _paths(tree: PyTree) -> dict[str, tuple]:
  """'params/Dense_0/kernel' -> shape for every leaf of a (metadata) tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[name] = tuple(getattr(leaf, "shape", ()))
  return out


def structure_diff(saved: PyTree, expected: PyTree) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, shape-mismatched) parameter paths between a saved and an expected tree."""
  s, e = _paths(saved), _paths(expected)
  missing = sorted(set(e) - set(s))
  unexpected = sorted(set(s) - set(e))
  mismatched = [f"{p} saved {s[p]} vs model {e[p]}" for p in sorted(set(s) & set(e)) if s[p] != e[p]]
  return missing, unexpected, mismatched


def _listing(label: str, items: list[str], limit: int = 8) -> str:
  if not items:
    return ""
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return f"{label}: {', '.join(items[:limit])}{more}"


def check_structure(saved_params: PyTree, expected_params: PyTree, where: str) -> None:
  """Raises CheckpointError naming every missing, unexpected and mismatched parameter path."""
  missing, unexpected, mismatched = structure_diff(saved_params, expected_params)
  if missing or unexpected or mismatched:
    parts = [_listing("missing", missing), _listing("unexpected", unexpected), _listing("shape mismatch", mismatched)]
    raise CheckpointError(
        f"The checkpoint {where} does not fit this model ({'; '.join(p for p in parts if p)}); "
        "use the config it was saved with, or load its parameters explicitly with --config.init_from."
    )


def _manager(directory: str, config: ConfigDict | None = None, read_only: bool = False) -> ocp.CheckpointManager:
  policies = []
  if config is not None:
    c = config.checkpoint
    policies.append(ocp.checkpoint_managers.LatestN(n=c.keep))
    if c.best_metric:
      metric = c.best_metric
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[metric], reverse=c.best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only,  # Leftovers of a save killed half-way.
      enable_async_checkpointing=bool(config is not None and config.checkpoint.async_save),
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies) if policies else None,
  )
  return ocp.CheckpointManager(directory, options=options)


def _versions() -> dict[str, str]:
  import flax, optax  # pylint: disable=g-import-not-at-top,multiple-import

  import jaxcollab  # pylint: disable=g-import-not-at-top

  return {"jaxcollab": jaxcollab.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "?"}


class CorruptCheckpointError(CheckpointError):
  """A finished step whose files cannot be read (truncated, deleted or overwritten)."""


class Checkpointer:
  """Saves a run's steps under WORKDIR/checkpoints and restores the newest good one."""

  def __init__(self, workdir: str, config: ConfigDict, dataset_info: dict[str, Any] | None = None):
    self.config = config
    self.dataset_info = dataset_info
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = _manager(self.directory, config)
    self.last_saved = -1
    self._signal = threading.Event()
    self._previous_handlers = {}
    # On several hosts, jax's preemption sync point owns SIGTERM so that all hosts save the same step.
    signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous_handlers[sig] = signal.signal(sig, lambda *_: self._signal.set())

  def restore_latest(self, run, train_iter) -> Any | None:
    """The newest finished step restored into `run`'s shardings (and `train_iter` positioned), or None."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self._restore(step, run, train_iter)
      except CorruptCheckpointError as e:
        if not self.config.checkpoint.fallback or i + 1 == len(steps):
          raise
        logging.warning("%s Falling back to step %d (checkpoint.fallback=true).", e, steps[i + 1])
    return None

  def _restore(self, step: int, run, train_iter):
    where = os.path.join(self.directory, str(step))
    saved = _item_metadata(self.manager, step, where)
    target = state_tree(run.state)
    check_structure(_model_part(saved), _model_part(target), where)
    args = {STATE: ocp.args.StandardRestore(_abstract(target, state_tree(run.shardings)))}
    if train_iter is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(train_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files.
      raise CorruptCheckpointError(
          f"Checkpoint step {step} at {where} could not be read ({_first_line(e)}); delete that step "
          "directory or rerun with --config.checkpoint.fallback=true to resume from the previous one."
      ) from e
    tree = restored[STATE]
    self.last_saved = step
    return run.state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                             batch_stats=tree.get("batch_stats", {}), rng=tree["rng"])

  def maybe_save(self, step: int, state, train_iter, eval_metrics: dict[str, float], force: bool = False) -> bool:
    """Saves every `checkpoint.every` steps, when forced, or after a signal; returns whether it saved."""
    self.check_errors()
    due = force or step % self.config.checkpoint.every == 0 or self._signal.is_set()
    if step == self.last_saved or not due:
      return False
    meta = {"step": step, "eval": dict(eval_metrics), "versions": _versions(), "dataset": self.dataset_info}
    args = {
        STATE: ocp.args.StandardSave(state_tree(state)),
        CONFIG: ocp.args.JsonSave(json.loads(config_lib.to_json(self.config))),
        META: ocp.args.JsonSave(meta),
    }
    if train_iter is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(train_iter)
    metric = self.config.checkpoint.best_metric
    metrics = {metric: eval_metrics[metric]} if metric and metric in eval_metrics else None
    self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)
    self.last_saved = step
    return True

  def preempted(self, step: int) -> bool:
    """True once SIGTERM/SIGINT arrived (on several hosts: once all reach jax's preemption sync step)."""
    return self._signal.is_set() or self.manager.reached_preemption(step)

  def check_errors(self) -> None:
    """Raises if a background write failed, instead of losing it silently."""
    try:
      self.manager.check_for_errors()
    except Exception as e:
      raise CheckpointError(f"Writing a checkpoint to {self.directory} failed ({_first_line(e)}); "
                            "check free disk space and permissions, then rerun to resume.") from e

  def close(self) -> None:
    """Waits for background writes, reports their errors, and puts the signal handlers back."""
    try:
      self.manager.wait_until_finished()
      self.check_errors()
    finally:
      self.manager.close()
      for sig, handler in self._previous_handlers.items():
        signal.signal(sig, handler)


def _model_part(tree: PyTree) -> dict[str, PyTree]:
  """What defines the model's structure: parameters and BatchNorm statistics."""
  return {k: tree[k] for k in ("params", "batch_stats") if k in tree}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _item_metadata(manager: ocp.CheckpointManager, step: int, where: str) -> PyTree:
  try:
    meta = manager.item_metadata(step)[STATE]
  except Exception as e:
    raise CorruptCheckpointError(
        f"Checkpoint step {step} at {where} has unreadable metadata ({_first_line(e)}); delete that step "
        "or rerun with --config.checkpoint.fallback=true to resume from the previous one.") from e
  if meta is None:
    raise CorruptCheckpointError(f"Checkpoint step {step} at {where} has no '{STATE}' item; it is incomplete.")
  return getattr(meta, "tree", meta)


# ---- Reading a checkpoint back outside training ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRef:
  """One finished step: its checkpoints directory and number."""

  directory: str
  step: int
  steps: tuple[int, ...]

  @property
  def path(self) -> str:
    return os.path.join(self.directory, str(self.step))


def resolve(path: str, step: int | None = None) -> StepRef:
  """A workdir, its checkpoints/ directory or one step directory -> the step to read."""
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint path {path!r} does not exist; pass a workdir, its checkpoints/ "
                          "directory or one step directory.")
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    directory = os.path.join(path, "checkpoints")
  elif os.path.isdir(os.path.join(path, STATE)) and os.path.basename(path).isdigit():
    directory, own = os.path.dirname(path), int(os.path.basename(path))
    if step is not None and step != own:
      raise CheckpointError(f"{path!r} is step {own}, not step {step}; pass its workdir to choose another step.")
    step = own
  else:
    directory = path
  steps = tuple(sorted(_manager(directory, read_only=True).all_steps())) if os.path.isdir(directory) else ()
  if not steps:
    raise CheckpointError(f"{path!r} holds no finished checkpoint; pass a workdir that `jaxcollab train` wrote "
                          "(with a checkpoints/ directory) or one of its step directories.")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise CheckpointError(f"Step {step} is not among the checkpoints in {directory} (available: "
                          f"{', '.join(map(str, steps))}); pass one of those.")
  return StepRef(directory, step, steps)


def _read_json(ref: StepRef, item: str) -> dict:
  file = os.path.join(ref.path, item, "metadata")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CorruptCheckpointError(f"Checkpoint step {ref.step} has no readable {item} file {file} "
                                 f"({_first_line(e)}); it was not written by jaxcollab or is damaged.") from e


def read_config(ref: StepRef) -> ConfigDict:
  """The config a step was trained with."""
  return config_lib.from_json(json.dumps(_read_json(ref, CONFIG)))


def read_meta(ref: StepRef) -> dict:
  """Step, eval metrics, dataset info and versions saved with a step."""
  return _read_json(ref, META)


def read_state_metadata(ref: StepRef) -> PyTree:
  """The saved state's tree of array metadata (shape, dtype), without reading any array."""
  return _item_metadata(_manager(ref.directory, read_only=True), ref.step, ref.path)


def read_state_numpy(ref: StepRef) -> dict[str, PyTree]:
  """The whole saved state as numpy arrays on the host, whatever mesh it was saved from."""
  meta = read_state_metadata(ref)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
  try:
    return ocp.StandardCheckpointer().restore(os.path.join(ref.path, STATE), target)
  except Exception as e:
    raise CorruptCheckpointError(
        f"Checkpoint step {ref.step} at {ref.path} could not be read ({_first_line(e)}); it is damaged.") from e


def load(path: str, step: int | None = None):
  """(model, variables, config) of a saved step, on this process's default device."""
  from jaxcollab import data, models  # pylint: disable=g-import-not-at-top

  ref = resolve(path, step)
  config = read_config(ref)
  info = data.DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in read_meta(ref)["dataset"].items()})
  model = models.build(config, info)
  saved = read_state_numpy(ref)
  expected = jax.eval_shape(lambda: _init_variables(model, info, config.seed))
  check_structure(_model_part(saved), {k: v for k, v in expected.items() if k in ("params", "batch_stats")}, ref.path)
  variables = jax.device_put(_model_part(saved))
  return model, variables, config


def _init_variables(model, info, seed: int) -> PyTree:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from jaxcollab import train  # pylint: disable=g-import-not-at-top

  sample = jax.tree.map(lambda x: x[:1], train.example_batch(info))
  return nn.unbox(model.init({"params": jax.random.PRNGKey(seed)}, train.model_input(sample), train=False))


def init_from(state, path: str):
  """Copies the parameters of another run that match by path and shape; logs what was and was not loaded."""
  ref = resolve(path)
  source = read_state_numpy(ref)["params"]
  missing, unexpected, mismatched = structure_diff(source, state.params)
  skipped = set(missing) | {m.split(" ")[0] for m in mismatched}
  flat_source = dict(_flat_leaves(source))
  loaded = []

  def take(name, target):
    if name in skipped:
      return target
    loaded.append(name)
    return jax.device_put(np.asarray(flat_source[name], target.dtype), target.sharding)

  params = jax.tree_util.tree_unflatten(
      jax.tree.structure(state.params), [take(n, x) for n, x in _flat_leaves(state.params)])
  logging.warning(
      "init_from %s (step %d): loaded %d parameter arrays; kept the fresh initialisation for %d (%s); "
      "ignored %d from the source (%s).", ref.path, ref.step, len(loaded), len(skipped),
      ", ".join(sorted(skipped)) or "none", len(unexpected), ", ".join(unexpected) or "none")
  return state.replace(params=params)


def _flat_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  names = list(_paths(tree))
  return list(zip(names, jax.tree.leaves(tree)))


def describe(path: str, step: int | None = None) -> dict[str, Any]:
  """What `jaxcollab inspect` shows: steps, config, metadata, metrics and the parameter tree."""
  ref = resolve(path, step)
  meta = read_state_metadata(ref)
  params = []
  for name, leaf in _flat_leaves(meta):
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    count = int(np.prod(shape, dtype=np.int64))
    params.append({"path": name, "shape": list(shape), "dtype": dtype.name, "count": count,
                   "bytes": count * dtype.itemsize})
  workdir = os.path.dirname(ref.directory)
  rows = []
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_file):
    with open(metrics_file) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  return {
      "directory": ref.directory, "steps": list(ref.steps), "step": ref.step,
      "config": _read_json(ref, CONFIG), "meta": read_meta(ref), "arrays": params,
      "param_count": sum(p["count"] for p in params if p["path"].startswith("params/")),
      "total_bytes": sum(p["bytes"] for p in params),
      "metrics_tail": rows[-5:],
  }
