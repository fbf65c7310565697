"""Training: a pure `train_step`, its jitted form, and the loop that orchestrates them."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxcollab import checkpoint, evaluate, metrics, models, plots, records, reload, runtime, sharding
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab import stop as stop_lib
from jaxcollab import workdir as workdir_lib
from jaxcollab.config import ConfigDict
from jaxcollab.data import augment, pipeline
from jaxcollab.errors import LOG_FILE, NonFiniteLossError, UserError, os_cause
from jaxcollab.run import Run, TrainState

PyTree = Any
# Calls the loop dispatches before it waits for the oldest one's metrics: with two, a host stall
# shorter than a call (a metrics row's fsync, another process on the core) leaves the device busy.
CALLS_IN_FLIGHT = 2


def train_step(
  state: TrainState, batch: dict[str, jax.Array], update_norm: bool = False
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One micro-step: gradients of the masked mean loss, an optimizer update, and health metrics.

  update_norm: also the norm of the update (`train.update_norm`). XLA:CPU has no multi-output fusion,
  so it costs a kernel per parameter shape that recomputes AdamW's update, and their reductions.
  """
  rng = jax.random.fold_in(state.rng, state.step)  # Same numbers at step N whether resumed or not.
  batch = augment.apply_to_batch(batch)  # Images move here, by the draws the pipeline made.
  mask = batch["mask"]

  def loss_of(params):
    logits, batch_stats = run_lib.forward(state, params, batch, is_training=True, rng=rng)
    per_example = state.loss_fn(logits, batch)
    loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    "loss": loss,
    "learning_rate": state.lr_fn(state.step),
    "grad_norm": optax.tree.norm(grads),
    "param_norm": optax.tree.norm(params),
  }
  if update_norm:
    out["update_norm"] = optax.tree.norm(updates)
  if "label" in batch:
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    out["accuracy"] = jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  else:
    out["bits_per_byte"] = loss / math.log(2)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)
  return new_state, out


def configured_step(config: ConfigDict) -> Callable:
  """`train_step` with the config's switches bound (`train.update_norm`): what every jitted step runs."""
  return functools.partial(train_step, update_norm=config.train.update_norm)


def jit_train_step(run: Run) -> jax.stages.Wrapped:
  """`train_step` compiled once with the run's shardings, donating the old state."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
    with sharding.activation_context(run.mesh, run.rules):  # Where the models' activation constraints resolve.
      return configured_step(run.config)(state, batch)

  return jax.jit(
    step,
    in_shardings=(run.shardings, sharding.batch_sharding(run.mesh)),
    out_shardings=(run.shardings, None),
    donate_argnums=0,
  )


def jit_train_step_ahead(run: Run) -> tuple[jax.stages.Wrapped, Callable[[], None]]:
  """`jit_train_step(run)`, compiling on a thread now; call the second function before the first step.

  The step is traced here from the run's abstract state and compiled by XLA on a thread (the GIL is
  free meanwhile), so the state's own init program compiles beside it: on a cold cache the two
  compilations overlap instead of queueing. A step called with arrays of those shapes and shardings
  finds the executable in jax's cache; a failed compilation is left to that call to raise, where the
  loop handles errors.
  """
  step = jit_train_step(run)
  batch = run_lib.abstract_batch(
    run.dataset.info, run.config.train.batch_size, sharding.batch_sharding(run.mesh), run.dataset.augments
  )
  compiled = sharding.compile_on_thread(
    step.lower(sharding.with_shardings(run.abstract_state, run.shardings), batch), "train_step"
  )

  def wait() -> None:
    with contextlib.suppress(Exception):  # The first step raises it again, where the loop handles errors.
      compiled()

  return step, wait


def compile_ahead(run: Run, init: bool = True) -> tuple[jax.stages.Wrapped, Callable[[], None], Callable | None]:
  """(step, wait for its compilation, the initial state's maker or None): how `jaxcollab train` starts.

  The step, the longest compilation (~2 s of a cold start on a 2-core CPU), is traced and starts
  compiling first; the init program (when `init`: no checkpoint to restore) compiles beside it on a
  second thread, small on the CPU since the host draws its random bits (`sharding.create_sharded`).
  benchmarks/cpu_vs_torch.py times its cold start through this same function.
  """
  step, compiled = jit_train_step_ahead(run)
  return step, compiled, run.init_state_ahead() if init else None


def jit_train_steps(run: Run, count: int) -> Callable:
  """`count` train steps in one jitted call, over batches stacked on a leading axis; metrics stacked too.

  The steps are unrolled rather than looped: XLA:CPU runs convolutions inside a while loop an order
  of magnitude slower (cnn_digits: 45 ms against 2.5 ms a step), and unrolled the results equal
  `count` calls of `jit_train_step` exactly for the MLP and the CNN (the GPT within 1e-6).
  """
  stacked = sharding.stacked_batch_sharding(run.mesh)

  def steps(state: TrainState, batches: dict[str, jax.Array]):
    with sharding.activation_context(run.mesh, run.rules):
      return jax.lax.scan(configured_step(run.config), state, batches, unroll=True)

  return jax.jit(steps, in_shardings=(run.shardings, stacked), out_shardings=(run.shardings, None), donate_argnums=0)


def evaluates_at(step: int, config: ConfigDict) -> bool:
  """Whether the loop evaluates after `step`: every `train.eval_every` steps and at the last."""
  return step % config.train.eval_every == 0 or step >= config.train.steps


def steps_in_call(step: int, config: ConfigDict) -> int:
  """Steps the next call runs after `step`: `train.steps_per_call`, or 1 where an eval or a save falls inside."""
  inside = range(step + 1, step + config.train.steps_per_call)
  if any(evaluates_at(s, config) or s % config.checkpoint.every == 0 for s in inside):
    return 1
  return config.train.steps_per_call


def _target_met(target: tuple[str, str, float] | None, result: dict[str, float]) -> bool:
  if target is None or target[0] not in result:
    return False
  name, op, value = target
  x = result[name]
  return {">=": x >= value, ">": x > value, "<=": x <= value, "<": x < value}[op]


class StepLogger:
  """Turns each call's device metrics into log rows, throughput and progress, `in_flight` calls late.

  Pulling the metrics of a call waits for it; pulling them `in_flight` calls late keeps that many
  calls queued on the device, so a host that stalls for less than that (a log write's fsync, the
  scheduler giving its core to another process) does not leave the device idle.
  """

  def __init__(
    self,
    writer: metrics.MetricWriter,
    progress: metrics.Progress,
    config: ConfigDict,
    start: int,
    per_batch: int,
    unit: str,
    in_flight: int = 1,
  ):
    self.writer, self.progress, self.config = writer, progress, config
    self.per_batch, self.unit, self.in_flight = per_batch, unit, in_flight
    # (last step, device metrics, count) of the calls not yet on the host, oldest first.
    self.pending: collections.deque[tuple[int, dict[str, jax.Array], int]] = collections.deque()
    self.last_step, self.last_time = start, time.perf_counter()  # Of the newest row written.
    self.flushed_step, self.flushed_time = start, self.last_time  # Of the newest call pulled.

  def push(self, step: int, device_metrics: dict[str, jax.Array], count: int = 0) -> None:
    """Records the metrics of the call that ended at `step`; pulls those of the calls `in_flight` back.

    `count` > 0: the metrics are stacked over the `count` steps that end at `step`.
    """
    self.pending.append((step, device_metrics, count))
    while len(self.pending) > self.in_flight:
      self._pull()

  def flush(self) -> None:
    """Pulls every call's metrics (waiting for the device), so that rows up to the newest step are written."""
    while self.pending:
      self._pull()

  def _pull(self) -> None:
    last, device_metrics, count = self.pending.popleft()
    host = jax.device_get(device_metrics)
    now, since = time.perf_counter(), self.flushed_step
    self.flushed_step, self.flushed_time, before = last, now, self.flushed_time
    if not count:
      host, count = {k: np.reshape(v, 1) for k, v in host.items()}, 1
    first = last - count + 1
    finite = np.isfinite(host["loss"])
    if not finite.all():
      step = first + int(np.argmin(finite))
      raise NonFiniteLossError(
        f"The loss became {float(host['loss'][step - first])} at step {step}; lower optimizer.learning_rate or "
        "set optimizer.grad_clip (finished checkpoints are kept)."
      )
    # Only the steps that log or print are made into rows; the steps of one call finish together,
    # so each is timed at its share of the interval since the previous call was pulled.
    every, total = self.config.train.log_every, self.config.train.steps
    for step in range(first, last + 1):
      if step % every == 0 or step == total:
        at = before + (now - before) * (step - since) / max(last - since, 1)
        values = {k: float(v[step - first]) for k, v in host.items()}
        values[self.unit] = (step - self.last_step) * self.per_batch / max(at - self.last_time, 1e-9)
        self.last_step, self.last_time = step, at
        self.writer.write(step, "train", values)
        self.progress.update(step, {"loss": values["loss"]})
    if last % every and last != total:
      self.progress.update(last, {"loss": float(host["loss"][-1])})


# Config keys that make each model smaller, named when it does not fit in device memory.
_SIZE_KEYS = {
  "gpt": "model.embed_dim, model.num_layers, model.mlp_dim or model.size",
  "mlp": "model.hidden",
  "cnn": "model.features or model.dense",
  "resnet": "model.width or model.depth",
}


def device_memory_bytes() -> int:
  """Memory of one local device: the allocator's limit on accelerators, RAM per device on a CPU."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(jax.local_device_count(), 1)


def state_bytes_per_device(run: Run) -> int:
  """Bytes of parameters and optimizer state on the most loaded device (from shapes and shardings only)."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(run.abstract_state), jax.tree.leaves(run.shardings)):
    shape = s.shard_shape(leaf.shape) if hasattr(s, "shard_shape") else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _memory_error(run: Run, where: str) -> UserError:
  c = run.config
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
  return UserError(
    f"Out of device memory {where}: the model has {params:,} parameters ({state_bytes_per_device(run) / 2**30:.2f} "
    f"GiB of train state per device with the optimizer), train.batch_size={c.train.batch_size}, and a device has "
    f"{device_memory_bytes() / 2**30:.1f} GiB; lower {_SIZE_KEYS.get(c.model.name, 'the model size')} or "
    "train.batch_size, or shard the state with mesh.fsdp."
  )


def check_memory(run: Run) -> None:
  """Refuses a train state that alone exceeds a device's memory, before anything is allocated."""
  if state_bytes_per_device(run) > device_memory_bytes():
    raise _memory_error(run, "before initialisation")


def ready(tree: PyTree, run: Run, where: str) -> PyTree:
  """Blocks on `tree`, so that an allocation failure surfaces here as one sentence instead of hanging later."""
  try:
    return jax.block_until_ready(tree)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      raise _memory_error(run, where) from e
    raise


def train_and_evaluate(config: ConfigDict, workdir: str, *, use_nonempty_workdir: bool = False) -> dict[str, float]:
  """Trains `config` into `workdir` (resuming if it has checkpoints); returns the final eval metrics.

  Returns {} when SIGTERM/SIGINT (or a preemption notice) stopped training early: the step reached
  is saved, and running the same command again continues from it exactly. The workdir contract
  (lock, config comparison on resume, run.json segments) is jaxcollab/workdir.py's.
  """
  with stop_lib.Stop(enabled=jax.process_count() == 1) as stop:
    run = run_lib.build(config)
    config = run.config
    target = config_lib.parse_target(config.train.target)  # Its metric was checked with the config (schema).
    check_memory(run)
    is_main = jax.process_index() == 0
    wd = _open_workdir(workdir, is_main, use_nonempty_workdir)
    stop.at_exit(wd.close)
    try:
      result, stopped = _train(run, wd, stop, target, is_main)
    except BaseException as e:
      wd.log_detail(e)
      with contextlib.suppress(OSError):  # A full disk must not hide the error that matters.
        wd.end_segment(None, "failed")
      if isinstance(e, OSError):
        raise workdir_lib.WorkdirError(
          f"Cannot use {e.filename or workdir}: {os_cause(e)}; free disk space or fix that path, then "
          f"rerun the same command to resume (details in {os.path.join(workdir, LOG_FILE)})."
        ) from e
      raise
    finally:
      wd.close()
  return result


def _open_workdir(path: str, is_main: bool, use_nonempty: bool) -> workdir_lib.Workdir:
  """Process 0 checks and locks the workdir; every process learns the outcome, so none waits on one that exited."""
  wd = workdir_lib.Workdir(path, writer=is_main, use_nonempty=use_nonempty)
  error = None
  try:
    wd.open()
  except UserError as e:
    error = e
  if jax.process_count() > 1:
    ok = np.asarray(multihost_utils.process_allgather(np.int32(error is None))).reshape(-1)
    if error is None and not ok.all():
      wd.close()
      failed = [i for i, flag in enumerate(ok) if not flag]
      raise workdir_lib.WorkdirError(f"Process(es) {failed} could not use --workdir {path}; see their message.")
  if error is not None:
    raise error
  return wd


def _train(
  run: Run, wd: workdir_lib.Workdir, stop: stop_lib.Stop, target: tuple[str, str, float] | None, is_main: bool
) -> tuple[dict[str, float], bool]:
  """The loop on an open workdir; returns (final metrics or {}, whether a signal stopped it)."""
  config, info, workdir = run.config, run.dataset.info, wd.path
  train_iter = run.dataset.train_iterator(
    batch_size=config.train.batch_size // jax.process_count(),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  checkpointer = checkpoint.Checkpointer(workdir, config, dataclasses.asdict(info), dict(run.mesh.shape), stop=stop)
  ok = False
  writer = progress = None
  changes: dict[str, list] = {}

  def check_config(step: int, saved: dict) -> None:
    portable = models.portable_keys(config.model.name)
    changes.update(workdir_lib.check_resume(saved, config, step, workdir, portable))

  try:
    # The step compiles while the state is restored or initialised; compiled() waits for it.
    step_fn, compiled, init_state = compile_ahead(run, init=not checkpointer.manager.all_steps())
    state = checkpointer.restore_latest(run.abstract_state, run.shardings, train_iter, check_config)
    if state is None:
      state = ready((init_state or run.init_state)(), run, "while initialising the parameters")
      if config.init_from:
        state = reload.init_from(state, config.init_from)
    start = int(jax.device_get(state.step))
    stop.setup_note = f"nothing new to save; newest checkpoint: step {start}" if start else "nothing saved yet"
    # First: it reads metrics.jsonl back, and a damaged line must stop us before anything is rewritten.
    writer = metrics.MetricWriter(workdir, enabled=is_main, resume_step=start)
    if is_main:
      config_json = config_lib.to_json(config)
      workdir_lib.write_config(workdir, config_json)
      metrics.write_run_info(workdir, config_json=config_json, mesh_shape=dict(run.mesh.shape), argv=list(sys.argv))
      wd.begin_segment(
        start,
        list(sys.argv),
        changes,
        processes=jax.process_count(),
        devices=jax.device_count(),
        mesh={str(k): int(v) for k, v in run.mesh.shape.items()},
      )
    if start:
      logging.info("Resuming from step %d in %s.", start, workdir)
      for key, (old, new) in changes.items():
        logging.info("Config %s changed from %r to %r (recorded in run.json).", key, old, new)
    unit = "examples_per_s" if info.kind == "image" else "tokens_per_s"
    per_batch = config.train.batch_size * (1 if info.kind == "image" else info.seq_len)
    progress = metrics.Progress(config.train.steps, initial=start, every=config.train.log_every, enabled=is_main)
    logger = StepLogger(writer, progress, config, start, per_batch, unit, in_flight=CALLS_IN_FLIGHT)
    per_call = config.train.steps_per_call
    steps_fn = jit_train_steps(run, per_call) if per_call > 1 else None
    evaluator = evaluate.Evaluator(run)
    evaluator.stop = stop
    batch_sharding = sharding.batch_sharding(run.mesh)
    stacked_sharding = sharding.stacked_batch_sharding(run.mesh)
    finished = start >= config.train.steps
    stopped = False
    step = start
    compiled()  # Before the first call, which would otherwise compile the step a second time.
    while not finished:
      if steps_fn is not None and steps_in_call(step, config) > 1:
        batches = pipeline.take(train_iter, per_call)
        if jax.process_count() > 1:  # Each process's block joins the global array.
          batches = sharding.to_global(batches, stacked_sharding)
        # One process: jit places the host arrays by its in_shardings inside the call, which took
        # 18-30% less of the loop's host time than a device_put before it (mlp_digits).
        state, step_metrics = steps_fn(state, batches)
        count = per_call
      else:
        batch = sharding.to_global(next(train_iter), batch_sharding)
        state, step_metrics = step_fn(state, batch)
        count = 0
      if step == start:  # Compiled and run once: an allocation failure is one sentence, and setup is over.
        state = ready(state, run, "at the first training step")
        stop.phase = stop_lib.TRAIN
        runtime.resume_gc()  # Paused by the CLI for its start-up.
      step += count or 1
      if wd.segment is not None:
        wd.segment["end_step"] = step
      logger.push(step, step_metrics, count)
      finished = step >= config.train.steps
      if evaluates_at(step, config):
        logger.flush()
        result = _evaluate(evaluator, state, stop)
        if result is not None:
          writer.write(step, "eval", result)
          checkpointer.record_eval(step, result)
          if _target_met(target, result):
            logging.info("Target %r met at step %d (%s).", config.train.target, step, result)
            finished = True
      # Every process asks at every step (after a call of several, for each of them, all asked): on
      # several hosts this is jax's preemption sync point, which may be any step.
      stopped = not finished and any([checkpointer.preempted(s) for s in range(step - (count or 1) + 1, step + 1)])
      stopped = stopped or stop.requested
      if finished or stopped or checkpointer.due(step):
        # Rows up to `step` reach metrics.jsonl before the step is saved, so a run killed after the
        # save and resumed from it logs exactly the rows an uninterrupted run logs.
        logger.flush()
        checkpointer.save(step, state, train_iter)
      if stopped:
        break
    logger.flush()
    progress.close()  # Before the classification report, which would otherwise start on the bar's line.
    final = None if stopped else _evaluate(evaluator, state, stop, final=(workdir, is_main))
    stopped = final is None
    result = final or {}
    if stopped:
      logging.warning(
        "Stopped by %s at step %d: checkpoint saved in %s; run the same command to resume.",
        checkpointer.stop_reason,
        step,
        os.path.join(checkpointer.directory, str(step)),
      )
    elif step > start:
      writer.write(step, "test" if info.eval_split == "test" else "eval_final", result)
    ok = True
  finally:
    if progress is not None:
      progress.close()
    checkpointer.close(raise_errors=ok)  # Awaits background writes; after an error, only logs theirs.
    if writer is not None:
      writer.close()
  if is_main and not stopped:  # Still under the lock, and a full disk here is one sentence too.
    plots.plot_curves(records.read_metrics(workdir), os.path.join(workdir, "plots", "curves.png"))
  wd.end_segment(step, "stopped" if stopped else "finished")
  return result, stopped


def _evaluate(
  evaluator: evaluate.Evaluator, state: TrainState, stop: stop_lib.Stop, final: tuple[str, bool] | None = None
) -> dict[str, float] | None:
  """An evaluation (or the final report) that a stop signal abandons: None then."""
  previous, stop.phase = stop.phase, stop_lib.EVAL if stop.phase != stop_lib.SETUP else stop.phase
  try:
    return evaluator.final_report(state, *final) if final else evaluator.evaluate(state)
  except stop_lib.Abandoned:
    logging.info("Evaluation abandoned: %s arrived.", stop.name)
    return None
  finally:
    stop.phase = previous
