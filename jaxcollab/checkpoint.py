"""Checkpoints during training: orbax saving, integrity checks, exact resume and the strict structure check.

A step directory `WORKDIR/checkpoints/<step>/` describes itself:
  state/          the train state as a plain pytree {step, params, opt_state, [batch_stats], rng}
  data/           the grain iterator position, one JSON file per process (grain's own orbax handler)
  config/         the resolved config (JSON, file `metadata`)
  meta/           step, eval metrics, dataset info, devices and library versions (JSON, file `metadata`)
  checksums.json  size and CRC32 of every file above, checked before any restore
orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete (one atomic
rename on a local filesystem), so a process killed at any moment leaves only finished steps visible;
leftover temporary directories are deleted when training starts again.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxcollab import choices, pytree, runtime
from jaxcollab import config as config_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import LOG_FILE, CheckpointError, CorruptCheckpointError, os_cause

PyTree = Any
STATE, DATA, CONFIG, META = "state", "data", "config", "meta"
CHECKSUMS = "checksums.json"
# orbax deletes old steps by renaming them here first (one atomic rename), so a process killed while
# deleting never leaves a half-deleted step that looks finished; we empty it between saves.
TRASH = ".deleted"
# orbax rewrites these two after our checksums are taken (commit timestamp, commit marker).
_ORBAX_LATE_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
# What `evaluate.summarize` reports per dataset kind; checked with the config, before jax starts, so a
# typo in checkpoint.best_metric fails at once instead of at the first save.
EVAL_METRICS = choices.EVAL_METRICS


def state_tree(state) -> dict[str, PyTree]:
  """The saved pytree of a TrainState: plain containers only, readable without jaxcollab."""
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  if state.batch_stats:  # orbax cannot store an empty subtree; models without BatchNorm have none.
    tree["batch_stats"] = state.batch_stats
  return tree


def leaf_shapes(tree: PyTree) -> dict[str, tuple]:
  """'params/Dense_0/kernel' -> shape for every leaf of a (metadata) tree."""
  return {name: tuple(getattr(leaf, "shape", ())) for name, leaf in pytree.leaf_paths(tree).items()}


def structure_diff(saved: PyTree, expected: PyTree) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, shape-mismatched) leaf paths between a saved and an expected tree."""
  s, e = leaf_shapes(saved), leaf_shapes(expected)
  # Parameters first: they say what changed in the model; optimizer moments only echo them.
  order = lambda paths: sorted(paths, key=lambda p: (not p.startswith("params/"), p))
  missing = order(set(e) - set(s))
  unexpected = order(set(s) - set(e))
  mismatched = [f"{p} saved {s[p]} vs model {e[p]}" for p in order(set(s) & set(e)) if s[p] != e[p]]
  return missing, unexpected, mismatched


def listing(label: str, items: list[str], limit: int = 8) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return f"{label}: {', '.join(items[:limit])}{more}" if items else ""


def check_structure(saved: PyTree, expected: PyTree, where: str) -> None:
  """Raises CheckpointError naming every missing, unexpected and mismatched path; never loads partially."""
  missing, unexpected, mismatched = structure_diff(saved, expected)
  if missing or unexpected or mismatched:
    parts = [listing("missing", missing), listing("unexpected", unexpected), listing("shape mismatch", mismatched)]
    raise CheckpointError(
      f"The checkpoint {where} does not fit this model and optimizer ({'; '.join(p for p in parts if p)}); "
      "train with the config it was saved with, use a new --workdir, or start from its parameters with "
      "--config.init_from."
    )


def first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:400]}" if text else type(e).__name__


# ---- Integrity: sizes and CRC32s of every file, taken before the step becomes visible ----------


def _file_digest(path: str) -> dict[str, int]:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)  # Releases the GIL on large buffers; training goes on meanwhile.
  return {"bytes": os.path.getsize(path), "crc32": crc}


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in _ORBAX_LATE_FILES and rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def write_checksums(step_dir: str) -> None:
  """Records every file's size and CRC32 in `step_dir/checksums.json`."""
  digests = {rel: _file_digest(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
  with open(os.path.join(step_dir, CHECKSUMS), "w") as f:
    json.dump(digests, f, indent=1, sort_keys=True)


def verify(step_dir: str, step: int, contents: bool = True) -> None:
  """Raises CorruptCheckpointError naming the first file whose size (or CRC32) differs from the save."""
  where = f"Checkpoint step {step} in {os.path.dirname(step_dir)}"
  try:
    with open(os.path.join(step_dir, CHECKSUMS)) as f:
      expected = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CorruptCheckpointError(f"{where} is damaged: {CHECKSUMS} is missing or unreadable ({first_line(e)})") from e
  for rel, want in sorted(expected.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      problem = "is missing"
    elif os.path.getsize(path) != want["bytes"]:
      problem = f"has {os.path.getsize(path)} bytes instead of the {want['bytes']} written"
    elif contents and _file_digest(path)["crc32"] != want["crc32"]:
      problem = "has different contents than were written (CRC32 mismatch)"
    else:
      continue
    raise CorruptCheckpointError(f"{where} is damaged: file {os.path.join(str(step), rel)} {problem}")


def _damaged(e: CorruptCheckpointError, previous: int | None) -> str:
  fix = (
    f"delete that step directory or rerun with --config.checkpoint.fallback=true to resume from step {previous}"
    if previous is not None
    else "delete that step directory to start over"
  )
  return f"{e}; {fix}."


# ---- Saving and resuming during training --------------------------------------------------------


class Checkpointer:
  """Saves a run's steps under WORKDIR/checkpoints and restores the newest good one."""

  def __init__(
    self, workdir: str, config: ConfigDict, dataset_info: dict[str, Any], mesh_shape: dict[str, int], stop=None
  ):
    c = config.checkpoint
    if c.best_metric and c.best_metric not in EVAL_METRICS[dataset_info["kind"]]:
      raise CheckpointError(
        f"checkpoint.best_metric {c.best_metric!r} is not an eval metric of this run; "
        f"choose one of {', '.join(EVAL_METRICS[dataset_info['kind']])} or ''."
      )
    self.config, self.dataset_info, self.mesh_shape = config, dataset_info, mesh_shape
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    policies = [ocp.checkpoint_managers.LatestN(n=c.keep)]
    if c.best_metric:  # Only steps saved right after an evaluation carry metrics and compete.
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[c.best_metric],
          reverse=c.best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      create=True,
      cleanup_tmp_directories=True,  # Leftovers of a save killed half-way.
      enable_async_checkpointing=True,  # Also for async_save=False (then awaited), for the callback below.
      async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      todelete_subdir=TRASH,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._empty_trash()
    self.last_saved = -1
    self.eval_step = -1  # The newest evaluation, saved so that a resume knows it.
    self.eval_metrics: dict[str, float] = {}
    self._writing = -1
    self.stop = stop  # A jaxcollab.stop.Stop that catches SIGTERM/SIGINT (one process), or None.

  def _seal(self) -> None:
    """orbax calls this in its writer thread once all files are written, before the atomic rename."""
    if jax.process_index() == 0:
      tmp = sorted(glob.glob(os.path.join(self.directory, f"{self._writing}.orbax-checkpoint-tmp*")))
      write_checksums(tmp[-1] if tmp else os.path.join(self.directory, str(self._writing)))
      self._empty_trash()  # Steps that the previous save retired; nothing else touches them now.

  def _empty_trash(self) -> None:
    if jax.process_index() == 0:
      shutil.rmtree(os.path.join(self.directory, TRASH), ignore_errors=True)

  def restore_latest(
    self, abstract_state: Any, shardings: Any, train_iter: Any, check_config: Callable[[int, dict], None] | None = None
  ) -> Any | None:
    """The newest good step restored as `abstract_state` with `shardings` (and `train_iter` positioned), or None.

    Only damage (checksums, sizes, unreadable metadata) lets `checkpoint.fallback` skip a step; any
    other failure to restore is raised as it is, naming its cause, and no step is moved.
    `check_config(step, saved_config)` runs before any array is read, so a refused config change
    stops the resume before the structure check would blame the shapes.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      previous = steps[i + 1] if i + 1 < len(steps) else None
      try:
        return self._restore(step, abstract_state, shardings, train_iter, check_config)
      except CorruptCheckpointError as e:
        if not self.config.checkpoint.fallback or previous is None:
          raise CorruptCheckpointError(_damaged(e, previous)) from e
        aside = self._move_aside(step)
        logging.warning(
          "%s; moved it to %s and falling back to step %d (checkpoint.fallback=true).", e, aside, previous
        )
    return None

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step to `<step>.corrupt` (not a step name), so the resumed run can save it again."""
    source = os.path.join(self.directory, str(step))
    target = source + ".corrupt"
    if jax.process_index() == 0:
      n = 1
      while os.path.exists(target):
        target, n = f"{source}.corrupt{n}", n + 1
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxcollab_move_aside_{step}")
    self.manager.reload()
    return target

  def _restore(
    self,
    step: int,
    abstract_state: Any,
    shardings: Any,
    train_iter: Any,
    check_config: Callable[[int, dict], None] | None = None,
  ) -> Any:
    path = os.path.join(self.directory, str(step))
    verify(path, step)
    meta = read_json(path, step, META)
    if check_config is not None:
      check_config(step, read_json(path, step, CONFIG))
    target = state_tree(abstract_state)
    check_structure(read_state_metadata(path, step), target, path)
    data_file = os.path.join(path, DATA, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if train_iter is not None and not os.path.exists(data_file):
      raise CheckpointError(
        f"Checkpoint step {step} in {self.directory} was saved by a different number of "
        "processes; resume it with as many processes as saved it (jaxcollab.load reads it "
        "anywhere)."
      )
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, state_tree(shardings)
    )
    args = {STATE: ocp.args.StandardRestore(abstract)}
    if train_iter is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(train_iter)
    try:
      tree = self.manager.restore(step, args=ocp.args.Composite(**args))[STATE]
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files.
      # The files passed their checksums, so this is not damage (memory, orbax, the filesystem):
      # name the cause and leave the step where it is.
      raise CheckpointError(
        f"Checkpoint step {step} in {self.directory} could not be restored ({first_line(e)}); "
        "its files are intact, so fix the cause named here and rerun."
      ) from e
    self.last_saved = step
    last = meta.get("last_eval") or {}
    self.eval_step, self.eval_metrics = last.get("step", -1), dict(last.get("metrics", {}))
    return abstract_state.replace(
      step=tree["step"],
      params=tree["params"],
      opt_state=tree["opt_state"],
      batch_stats=tree.get("batch_stats", {}),
      rng=tree["rng"],
    )

  def record_eval(self, step: int, metrics: dict[str, float]) -> None:
    """Remembers the newest evaluation for the metadata and the best-step bookkeeping."""
    self.eval_step, self.eval_metrics = step, dict(metrics)

  def preempted(self, step: int) -> bool:
    """True once SIGTERM/SIGINT arrived (on several hosts: once all reach jax's preemption sync step)."""
    return (self.stop is not None and self.stop.requested) or self.manager.reached_preemption(step)

  @property
  def stop_reason(self) -> str:
    return self.stop.name if self.stop is not None and self.stop.requested else "a preemption notice"

  def due(self, step: int) -> bool:
    """Whether `checkpoint.every` asks for a save at `step`."""
    return step % self.config.checkpoint.every == 0

  def save(self, step: int, state, train_iter) -> None:
    """Starts writing `step` in the background (once per step); raises if an earlier write failed."""
    if step == self.last_saved:
      return
    evaluated = self.eval_step == step
    meta = {
      "step": step,
      "eval": self.eval_metrics if evaluated else {},
      "last_eval": {"step": self.eval_step, "metrics": self.eval_metrics} if self.eval_step >= 0 else None,
      "dataset": self.dataset_info,
      "mesh": self.mesh_shape,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "platform": jax.devices()[0].platform,
      "versions": runtime.versions(),
    }
    args = {
      STATE: ocp.args.StandardSave(state_tree(state)),
      CONFIG: ocp.args.JsonSave(json.loads(config_lib.to_json(self.config))),
      META: ocp.args.JsonSave(meta),
    }
    if train_iter is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(train_iter)  # Its position is read now, synchronously.
    metric = self.config.checkpoint.best_metric
    metrics = {metric: self.eval_metrics[metric]} if metric and evaluated else None
    try:
      self.manager.wait_until_finished()  # Surfaces a failed earlier write before starting this one.
      self._writing = step
      self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)
      if not self.config.checkpoint.async_save:
        self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from e
    self.last_saved = step

  def _write_error(self, e: BaseException) -> CheckpointError:
    steps = finished_steps(self.directory)
    resume = f"step {steps[-1]}" if steps else "the start"
    log = os.path.join(os.path.dirname(self.directory), LOG_FILE)
    return CheckpointError(
      f"Writing checkpoint step {self._writing} to {self.directory} failed: "
      f"{os_cause(e)}; free disk space or fix permissions, then rerun the same "
      f"command to resume from {resume} (details in {log})."
    )

  def close(self, raise_errors: bool = True) -> None:
    """Waits for background writes and reports their errors."""
    try:
      self.manager.wait_until_finished()
      self._empty_trash()
    except Exception as e:  # pylint: disable=broad-except
      if raise_errors:
        raise self._write_error(e) from e
      logging.error("%s", self._write_error(e))
    finally:
      self.manager.close()


# ---- Reading step files (training's restore and jaxcollab.reload share these) ------------------


def finished_steps(directory: str) -> tuple[int, ...]:
  """Steps that orbax finalized (no temporary directories) and that carry orbax's step metadata."""
  if not os.path.isdir(directory):
    return ()
  steps = ocp.utils.checkpoint_steps(directory)
  return tuple(sorted(s for s in steps if os.path.isfile(os.path.join(directory, str(s), "_CHECKPOINT_METADATA"))))


def read_json(step_dir: str, step: int, item: str) -> dict:
  file = os.path.join(step_dir, item, "metadata")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # ValueError: invalid JSON or invalid UTF-8.
    raise CorruptCheckpointError(
      f"Checkpoint step {step} has no readable {item} file {file} "
      f"({first_line(e)}); it was not written by jaxcollab or is damaged"
    ) from e


def read_state_metadata(step_dir: str, step: int) -> PyTree:
  """The saved state's tree of array metadata (shape, dtype), without reading any array."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(epath.Path(step_dir) / STATE).tree
  except Exception as e:  # A damaged _METADATA gives a decoding error or an empty tree.
    raise CorruptCheckpointError(
      f"Checkpoint step {step} in {os.path.dirname(step_dir)} is damaged: file "
      f"{step}/{STATE}/_METADATA cannot be read ({first_line(e)})"
    ) from e
  finally:
    handler.close()


def model_part(tree: PyTree) -> dict[str, PyTree]:
  """What defines the model: parameters and BatchNorm statistics."""
  return {k: tree[k] for k in ("params", "batch_stats") if k in tree}
