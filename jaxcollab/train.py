"""Training: a pure `train_step`, its jitted form, and the loop that orchestrates them."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcollab import checkpoint, evaluate, metrics, plots, records, reload, sharding
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import NonFiniteLossError
from jaxcollab.run import Run, TrainState

PyTree = Any


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One micro-step: gradients of the masked mean loss, an optimizer update, and health metrics."""
  rng = jax.random.fold_in(state.rng, state.step)  # Same numbers at step N whether resumed or not.
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
      "update_norm": optax.tree.norm(updates),
  }
  if "label" in batch:
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    out["accuracy"] = jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  else:
    out["bits_per_byte"] = loss / math.log(2)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
  )
  return new_state, out


def jit_train_step(run: Run) -> Callable:
  """`train_step` compiled once with the run's shardings, donating the old state."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
    with sharding.activation_context(run.mesh, run.rules):  # Where the models' activation constraints resolve.
      return train_step(state, batch)

  return jax.jit(
      step,
      in_shardings=(run.shardings, sharding.batch_sharding(run.mesh)),
      out_shardings=(run.shardings, None),
      donate_argnums=0,
  )


def _target_met(target: tuple[str, str, float] | None, result: dict[str, float]) -> bool:
  if target is None or target[0] not in result:
    return False
  name, op, value = target
  x = result[name]
  return {">=": x >= value, ">": x > value, "<=": x <= value, "<": x < value}[op]


class StepLogger:
  """Turns each step's device metrics into log rows, throughput and progress, one step late."""

  def __init__(self, writer: metrics.MetricWriter, progress: metrics.Progress, config: ConfigDict,
               start: int, per_batch: int, unit: str):
    self.writer, self.progress, self.config = writer, progress, config
    self.per_batch, self.unit = per_batch, unit
    self.pending: tuple[int, dict[str, jax.Array]] | None = None  # (step, device metrics) not yet on the host.
    self.last_step, self.last_time = start, time.perf_counter()

  def push(self, step: int, device_metrics: dict[str, jax.Array]) -> None:
    """Records `step`'s metrics and pulls the previous step's, which has finished by now."""
    self.flush()
    self.pending = (step, device_metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, device_metrics = self.pending
    self.pending = None
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(values["loss"]):
      raise NonFiniteLossError(
          f"The loss became {values['loss']} at step {step}; lower optimizer.learning_rate or set "
          "optimizer.grad_clip (finished checkpoints are kept)."
      )
    if step % self.config.train.log_every == 0 or step == self.config.train.steps:
      now = time.perf_counter()
      values[self.unit] = (step - self.last_step) * self.per_batch / max(now - self.last_time, 1e-9)
      self.last_step, self.last_time = step, now
      self.writer.write(step, "train", values)
    self.progress.update(step, {"loss": values["loss"]})


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` into `workdir` (resuming if it has checkpoints); returns the final eval metrics.

  Returns {} when SIGTERM/SIGINT (or a preemption notice) stopped training early: the step reached
  is saved, and running the same command again continues from it exactly.
  """
  run = run_lib.build(config)
  config, info = run.config, run.dataset.info
  target = config_lib.parse_target(config.train.target)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  train_iter = run.dataset.train_iterator(
      batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  checkpointer = checkpoint.Checkpointer(workdir, config, dataclasses.asdict(info), dict(run.mesh.shape))
  ok = False
  writer = progress = None
  try:
    state = checkpointer.restore_latest(run.abstract_state, run.shardings, train_iter)
    if state is None:
      state = run.init_state()
      if config.init_from:
        state = reload.init_from(state, config.init_from)
    start = int(jax.device_get(state.step))
    if is_main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
      metrics.write_run_info(workdir, config_json=config_lib.to_json(config), mesh_shape=dict(run.mesh.shape),
                             argv=list(sys.argv))
    if start:
      logging.info("Resuming from step %d in %s.", start, workdir)
    writer = metrics.MetricWriter(workdir, enabled=is_main, resume_step=start)
    unit = "examples_per_s" if info.kind == "image" else "tokens_per_s"
    per_batch = config.train.batch_size * (1 if info.kind == "image" else info.seq_len)
    progress = metrics.Progress(config.train.steps, initial=start, every=config.train.log_every, enabled=is_main)
    logger = StepLogger(writer, progress, config, start, per_batch, unit)
    step_fn = jit_train_step(run)
    evaluator = evaluate.Evaluator(run)
    batch_sharding = sharding.batch_sharding(run.mesh)
    finished = start >= config.train.steps
    stopped = False
    step = start
    while not finished:
      batch = sharding.to_global(next(train_iter), batch_sharding)
      state, step_metrics = step_fn(state, batch)
      step += 1
      logger.push(step, step_metrics)
      finished = step >= config.train.steps
      if step % config.train.eval_every == 0 or finished:
        logger.flush()
        result = evaluator.evaluate(state)
        writer.write(step, "eval", result)
        checkpointer.record_eval(step, result)
        if _target_met(target, result):
          logging.info("Target %r met at step %d (%s).", config.train.target, step, result)
          finished = True
      # Every process asks at every step: on several hosts this is jax's preemption sync point.
      stopped = not finished and checkpointer.preempted(step)
      if finished or stopped or checkpointer.due(step):
        # Rows up to `step` reach metrics.jsonl before the step is saved, so a run killed after the
        # save and resumed from it logs exactly the rows an uninterrupted run logs.
        logger.flush()
        checkpointer.save(step, state, train_iter)
      if stopped:
        break
    logger.flush()
    if stopped:
      logging.warning("Stopped by %s at step %d: checkpoint saved in %s; run the same command to resume.",
                      checkpointer.stop_reason, step, os.path.join(checkpointer.directory, str(step)))
      result = {}
    else:
      result = evaluator.final_report(state, workdir, write=is_main)
      if step > start:
        writer.write(step, "test" if info.eval_split == "test" else "eval_final", result)
    ok = True
  finally:
    if progress is not None:
      progress.close()
    checkpointer.close(raise_errors=ok)  # Awaits background writes; after an error, only logs theirs.
    if writer is not None:
      writer.close()
  if is_main and not stopped:
    plots.plot_curves(records.read_metrics(workdir), os.path.join(workdir, "plots", "curves.png"))
  return result
