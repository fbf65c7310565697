"""Several seeds of one config trained in one program: the state stacked on a leading seed axis.

`jax.vmap(train.train_step)` runs every seed in the same jitted step (one compile); each seed keeps
its own initialisation, data order, augmentation and dropout keys (they all derive from its own
`seed`), and writes its own workdir exactly as `jaxcollab train` would, so that `train` on any one
of them resumes it, and `eval`, `inspect` and `jaxcollab.load` read it.

The seed axis is replicated over the run's mesh: every device holds every seed's slice of the
parameters and the batch is split over `data` inside each seed, as in a single run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcollab import checkpoint, evaluate, metrics, models, sharding, train
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab import stop as stop_lib
from jaxcollab import workdir as workdir_lib
from jaxcollab.config import ConfigDict
from jaxcollab.data import pipeline
from jaxcollab.run import TrainState

PyTree = Any
_DATA_FIELDS = ("step", "params", "opt_state", "batch_stats", "rng")


def why_not_vmapped(config: ConfigDict) -> str | None:
  """The reason these seeds must train one at a time, or None when they can share one program."""
  config = run_lib.resolve(config, drop_unread=True)
  if config.model.name == "resnet":
    return "BatchNorm statistics (model resnet) are mutable state that this loop does not stack"
  if config.train.target:
    return "train.target stops each seed at its own step"
  if config.init_from:
    return "init_from restores one checkpoint into one state"
  if jax.process_count() > 1:
    return "several processes each feed their own slice of one run's batch"
  return None


def _stack(states: list[TrainState], like: TrainState) -> TrainState:
  """One TrainState whose array leaves carry a leading seed axis; static fields from `like`."""
  fields = {f: jax.tree.map(lambda *xs: jnp.stack(xs), *[getattr(s, f) for s in states]) for f in _DATA_FIELDS}
  return like.replace(**fields)


def _unstack(state: TrainState, i: int) -> TrainState:
  return state.replace(**{f: jax.tree.map(lambda x: x[i], getattr(state, f)) for f in _DATA_FIELDS})


def _seed_axis(s: NamedSharding) -> NamedSharding:
  return NamedSharding(s.mesh, P(None, *s.spec))


def _same_but_seed(configs: list[ConfigDict]) -> None:
  def without_seed(c):
    d = c.to_dict()
    d.pop("seed")
    return config_lib.to_json(ConfigDict(d))

  if len({without_seed(c) for c in configs}) != 1:
    raise ValueError("train_seeds needs configs that differ only in their seed.")


class Stacked:
  """The runs of S seeds, their stacked state's shardings and the vmapped, jitted train and eval steps."""

  def __init__(self, configs: list[ConfigDict]):
    _same_but_seed(configs)
    self.runs = [run_lib.build(c) for c in configs]
    run = self.runs[0]
    self.mesh, self.rules = run.mesh, run.rules
    self.shardings = jax.tree.map(_seed_axis, run.shardings)
    self.batch_sharding = _seed_axis(sharding.batch_sharding(run.mesh))

    one_step = train.configured_step(run.config)

    def step(state, batch):
      with sharding.activation_context(run.mesh, run.rules):
        return jax.vmap(one_step)(state, batch)

    self.train_step = jax.jit(
      step, in_shardings=(self.shardings, self.batch_sharding), out_shardings=(self.shardings, None), donate_argnums=0
    )
    # train.steps_per_call > 1: that many vmapped steps unrolled in one call (see train.jit_train_steps).
    self.per_call = run.config.train.steps_per_call
    self.calls_sharding = _seed_axis(self.batch_sharding)

    def steps(state, batches):
      with sharding.activation_context(run.mesh, run.rules):
        return jax.lax.scan(jax.vmap(one_step), state, batches, unroll=True)

    self.train_steps = jax.jit(
      steps, in_shardings=(self.shardings, self.calls_sharding), out_shardings=(self.shardings, None), donate_argnums=0
    )
    self._unstack: Callable[[TrainState], list[TrainState]] | None = None
    self.evaluator = evaluate.Evaluator(run)
    self.eval_step = jax.jit(
      jax.vmap(self.evaluator.eval_step, in_axes=(0, 0, None)),
      in_shardings=(self.shardings.params, self.shardings.batch_stats, self.evaluator.batch_sharding),
      out_shardings=NamedSharding(run.mesh, P()),
    )

  def init_state(self) -> TrainState:
    """Every seed's initial state (the same numbers as its own `run.init_state()`), in one compiled program."""
    like = self.runs[0].abstract_state
    return sharding.create_sharded(lambda: _stack([r.init_fn() for r in self.runs], like), self.shardings)

  def stack(self, states: list[TrainState]) -> TrainState:
    return jax.device_put(_stack(states, self.runs[0].abstract_state), self.shardings)

  def unstack(self, state: TrainState) -> list[TrainState]:
    """Each seed's state, sliced in one compiled program (eager slicing would compile one per leaf shape)."""
    if self._unstack is None:
      self._unstack = jax.jit(
        lambda s: [_unstack(s, i) for i in range(len(self.runs))],
        out_shardings=[self.runs[0].shardings] * len(self.runs),
      )
    assert self._unstack is not None
    return self._unstack(state)

  def batch(self, local: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """The seeds' batches stacked on the seed axis, placed in one transfer."""
    return jax.device_put(pipeline.stack(local), self.batch_sharding)  # One process (why_not_vmapped).

  def batches(self, rounds: list[list[dict[str, np.ndarray]]]) -> dict[str, jax.Array]:
    """Several steps' batches, [step, seed, batch, ...], for `train_steps`."""
    return jax.device_put(pipeline.stack([pipeline.stack(r) for r in rounds]), self.calls_sharding)

  def eval_sums(self, state: TrainState) -> list[dict[str, np.ndarray]]:
    """Each seed's eval sums (see `Evaluator.sums`), every eval batch evaluated for all seeds at once."""
    e = self.evaluator
    totals = evaluate.sum_on_host(
      self.eval_step(state.params, state.batch_stats, sharding.to_global(local, e.batch_sharding))
      for local in self.runs[0].dataset.eval_batches(batch_size=e.per_process)
    )
    return [{k: v[i] for k, v in totals.items()} for i in range(len(self.runs))]


@dataclasses.dataclass
class _Seed:
  """One seed's side: its open workdir, data iterator, checkpointer, metric writer and step logger."""

  wd: workdir_lib.Workdir
  config: ConfigDict
  train_iter: Any
  ckpt: checkpoint.Checkpointer
  changes: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # Config changes on resume.
  writer: metrics.MetricWriter = None  # type: ignore[assignment]  # Set when the loop starts.
  logger: train.StepLogger = None  # type: ignore[assignment]


def train_seeds(
  configs: list[ConfigDict], workdirs: list[str], on_step: Callable[[int], None] | None = None
) -> list[dict[str, float]] | None:
  """Trains configs that differ only in `seed` together, seed i into workdirs[i]; final eval per seed.

  Each workdir follows `jaxcollab train`'s contract (lock, config check on resume, run.json segments).
  Resumes when every workdir holds a checkpoint of the same step. Returns None when the seeds cannot
  share a program here (a reason from `why_not_vmapped`, or checkpoints at different steps): the caller
  trains them one at a time. Returns [] when a signal stopped training (every seed saved its step).
  """
  if why_not_vmapped(configs[0]) is not None:
    return None
  with stop_lib.Stop(enabled=jax.process_count() == 1) as stop:
    stacked = Stacked(configs)
    seeds: list[_Seed] = []
    try:
      for r, w in zip(stacked.runs, workdirs):
        wd = workdir_lib.Workdir(w).open()
        stop.at_exit(wd.close)
        it = r.dataset.train_iterator(batch_size=r.config.train.batch_size, seed=r.config.seed)
        ckpt = checkpoint.Checkpointer(w, r.config, dataclasses.asdict(r.dataset.info), dict(r.mesh.shape), stop=stop)
        seeds.append(_Seed(wd, r.config, it, ckpt))
      portable = models.portable_keys(configs[0].model.name)
      restored = []
      for s, r in zip(seeds, stacked.runs):

        def check_config(step: int, saved: dict, s: _Seed = s) -> None:
          s.changes.update(workdir_lib.check_resume(saved, s.config, step, s.wd.path, portable))

        restored.append(s.ckpt.restore_latest(r.abstract_state, r.shardings, s.train_iter, check_config))
      if any(x is not None for x in restored):
        if len({None if x is None else int(jax.device_get(x.step)) for x in restored}) != 1:
          return None
        state = stacked.stack([x for x in restored if x is not None])
      else:
        state = stacked.init_state()
      results = _loop(stacked, seeds, state, stop, on_step)
    except BaseException as e:
      for s in seeds:
        s.wd.log_detail(e)
        with contextlib.suppress(OSError):
          s.wd.end_segment(None, "failed")
      raise
    finally:
      for s in reversed(seeds):
        s.ckpt.close(raise_errors=False)
        if s.writer is not None:
          s.writer.close()
        s.wd.close()
  return results


def _loop(
  stacked: Stacked,
  seeds: list[_Seed],
  state: TrainState,
  stop: stop_lib.Stop,
  on_step: Callable[[int], None] | None,
) -> list[dict[str, float]]:
  run = stacked.runs[0]
  config, info = run.config, run.dataset.info
  start = int(jax.device_get(state.step[0]))
  unit = "examples_per_s" if info.kind == "image" else "tokens_per_s"
  per_batch = config.train.batch_size * (1 if info.kind == "image" else info.seq_len)
  mesh = {str(k): int(v) for k, v in run.mesh.shape.items()}
  for s in seeds:
    text = config_lib.to_json(s.config)
    s.writer = metrics.MetricWriter(s.wd.path, resume_step=start)  # First: it reads metrics.jsonl back.
    workdir_lib.write_config(s.wd.path, text)
    metrics.write_run_info(s.wd.path, config_json=text, mesh_shape=dict(run.mesh.shape), argv=list(sys.argv))
    s.wd.begin_segment(
      start, list(sys.argv), s.changes, processes=1, devices=jax.device_count(), mesh=mesh, vmapped_seeds=len(seeds)
    )
    progress = metrics.Progress(config.train.steps, initial=start, enabled=False)
    s.logger = train.StepLogger(s.writer, progress, s.config, start, per_batch, unit)

  pending = None  # (last step, device metrics stacked over [steps of the call,] seeds, count) not yet pulled.

  def flush():
    nonlocal pending
    if pending is None:
      return
    last, device_metrics, count = pending
    pending = None
    host = jax.device_get(device_metrics)  # One transfer for all seeds.
    per_step = [{k: v[j] for k, v in host.items()} for j in range(count)] if count else [host]
    for step, row in zip(range(last - len(per_step) + 1, last + 1), per_step):
      # Checked at every step, as train does; rows are built only on the steps that log them.
      if step % config.train.log_every == 0 or step == config.train.steps or not np.isfinite(row["loss"]).all():
        for i, s in enumerate(seeds):
          s.logger.push(step, {k: v[i] for k, v in row.items()})
          s.logger.flush()

  def evaluate_all(step):
    flush()
    sums = stacked.eval_sums(state)
    for s, seed_sums in zip(seeds, sums):
      result = evaluate.summarize(seed_sums)
      s.writer.write(step, "eval", result)
      s.ckpt.record_eval(step, result)
    return sums

  step, sums, stopped = start, None, False
  finished = start >= config.train.steps
  while not finished:
    count = train.steps_in_call(step, config) if stacked.per_call > 1 else 1
    if count > 1:
      rounds = [[next(s.train_iter) for s in seeds] for _ in range(count)]
      state, step_metrics = stacked.train_steps(state, stacked.batches(rounds))
    else:
      state, step_metrics = stacked.train_step(state, stacked.batch([next(s.train_iter) for s in seeds]))
    if step == start:
      stop.phase = stop_lib.TRAIN  # Compiled: from here a signal saves the step reached.
    step += count
    for s in seeds:
      if s.wd.segment is not None:
        s.wd.segment["end_step"] = step
    flush()
    pending = (step, step_metrics, count if count > 1 else 0)
    finished = step >= config.train.steps
    if train.evaluates_at(step, config):
      sums = evaluate_all(step)
    stopped = not finished and (stop.requested or any(s.ckpt.preempted(step) for s in seeds))
    if finished or stopped or seeds[0].ckpt.due(step):
      flush()
      for s, seed_state in zip(seeds, stacked.unstack(state)):
        s.ckpt.save(step, seed_state, s.train_iter)
    if on_step is not None:
      on_step(step)
    if stopped:
      for s in seeds:
        s.wd.end_segment(step, "stopped")
      return []
  flush()
  if sums is None:  # Already finished before this call: evaluate the restored state once.
    sums = stacked.eval_sums(state)
  results = []
  for s, seed_sums in zip(seeds, sums):
    result = stacked.evaluator.report(seed_sums, s.wd.path)
    if step > start:
      s.writer.write(step, "test" if info.eval_split == "test" else "eval_final", result)
    s.wd.end_segment(step, "finished")
    results.append(result)
  return results


def time_steps(configs: list[ConfigDict], steps: int) -> float:
  """Seconds per vmapped step after compilation (benchmarks)."""
  stacked = Stacked(configs)
  state = stacked.init_state()
  iters = [r.dataset.train_iterator(batch_size=r.config.train.batch_size, seed=r.config.seed) for r in stacked.runs]

  def batch():
    return stacked.batch([next(it) for it in iters])

  state, m = stacked.train_step(state, batch())
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = stacked.train_step(state, batch())
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps
