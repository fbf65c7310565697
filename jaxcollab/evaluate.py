"""Evaluation: sums over the whole eval split on the devices, then loss, accuracy, perplexity, reports."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcollab import metrics, plots, reload, sharding
from jaxcollab import run as run_lib

PyTree = Any


class Evaluator:
  """Evaluates parameters of a run on its eval split; every example counts exactly once."""

  def __init__(self, run: run_lib.Run):
    self.run = run
    self.info = run.dataset.info
    # (parameter and statistics arrays, their sums) of the newest evaluation; holding the arrays keeps
    # their identities unique, so `is` tells whether the same parameters are asked for again.
    self._last: tuple[list[Any], dict[str, np.ndarray]] | None = None
    self.stop: Any = None  # A jaxcollab.stop.Stop whose signal abandons an evaluation at the next batch.
    config = run.config
    self.per_process = config.train.eval_batch_size // jax.process_count()
    self.batch_sharding = sharding.batch_sharding(run.mesh)
    classes = self.info.num_classes if self.info.kind == "image" else 0
    loss_fn = run.abstract_state.loss_fn
    apply_fn = run.abstract_state.apply_fn

    def eval_step(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
      with sharding.activation_context(run.mesh, run.rules):  # Resolves the models' activation constraints.
        logits = apply_fn(run_lib.variables(params, batch_stats), run_lib.model_input(batch), train=False)
      mask = batch["mask"]
      sums = {"loss": jnp.sum(loss_fn(logits, batch) * mask), "count": jnp.sum(mask)}
      if classes:
        pred = jnp.argmax(logits, -1)
        true_BxC = jax.nn.one_hot(batch["label"], classes) * mask[:, None]
        sums["confusion"] = true_BxC.T @ jax.nn.one_hot(pred, classes)  # rows: true class, cols: predicted.
      return sums

    self.eval_step = eval_step  # Unjitted, for callers that vmap it over a leading seed axis.
    replicated = NamedSharding(run.mesh, P())  # Every process can read the sums.
    self._step = jax.jit(
      eval_step,
      in_shardings=(run.shardings.params, run.shardings.batch_stats, self.batch_sharding),
      out_shardings=replicated,
    )

  def sums(self, params: PyTree, batch_stats: PyTree) -> dict[str, np.ndarray]:
    """Loss sum, example (or token) count and confusion matrix over the whole eval split."""

    def outputs() -> Iterator[dict[str, jax.Array]]:
      for local in self.run.dataset.eval_batches(
        batch_size=self.per_process, process_index=jax.process_index(), process_count=jax.process_count()
      ):
        if self.stop is not None:
          self.stop.check()
        yield self._step(params, batch_stats, sharding.to_global(local, self.batch_sharding))

    return sum_on_host(outputs())

  def _state_sums(self, state: run_lib.TrainState) -> dict[str, np.ndarray]:
    # The loop evaluates at the last step and then asks for the final report of the same state:
    # remember the sums of these very arrays so the eval split is not run twice.
    leaves = jax.tree.leaves((state.params, state.batch_stats))
    cached = (
      self._last is not None
      and len(self._last[0]) == len(leaves)
      and all(a is b for a, b in zip(self._last[0], leaves))
    )
    if not cached:
      self._last = (leaves, self.sums(state.params, state.batch_stats))
    assert self._last is not None
    return self._last[1]

  def evaluate(self, state: run_lib.TrainState) -> dict[str, float]:
    """loss and accuracy (classifiers) or loss, perplexity and bits_per_byte (LMs)."""
    return summarize(self._state_sums(state))

  def final_report(self, state: run_lib.TrainState, workdir: str, write: bool = True) -> dict[str, float]:
    """Final metrics; for classifiers also per-class precision/recall/F1 and a confusion-matrix PNG."""
    return self.report(self._state_sums(state), workdir, write)

  def report(self, sums: dict[str, np.ndarray], workdir: str, write: bool = True) -> dict[str, float]:
    """`final_report` from eval sums already computed (the vmapped seeds compute theirs together)."""
    result = summarize(sums)
    if "confusion" in sums and write:
      confusion = sums["confusion"].astype(np.int64)
      report = metrics.classification_report(confusion)
      plot_dir = os.path.join(workdir, "plots")
      os.makedirs(plot_dir, exist_ok=True)
      plots.plot_confusion(
        confusion,
        os.path.join(plot_dir, "confusion.png"),
        title=f"{self.info.name} {self.info.eval_split}: accuracy {result['accuracy']:.4f}",
      )
      with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(
          {"split": self.info.eval_split, "metrics": result, **report, "confusion": confusion.tolist()}, f, indent=2
        )
      print(metrics.format_report(report))
    return result


def sum_on_host(outputs: Iterable[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  """Adds the per-batch sums in float64 on the host, each pulled one batch late so the device stays busy.

  Not with eager `jnp.add` on the device: with several processes, eager additions between the jitted
  eval steps hung both processes now and then under load (tests/multihost_test.py), and float64 on the
  host keeps large counts exact.
  """
  totals: dict[str, np.ndarray] = {}
  pending = None
  for out in itertools.chain(outputs, [None]):
    if pending is not None:
      for k, v in jax.device_get(pending).items():
        totals[k] = totals[k] + np.asarray(v, np.float64) if k in totals else np.asarray(v, np.float64)
    pending = out
  return totals


def summarize(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Means from sums: the confusion matrix gives accuracy; a token count gives bits per byte."""
  count = max(float(sums["count"]), 1.0)
  loss = float(sums["loss"]) / count
  out = {"loss": loss}
  if "confusion" in sums:
    out["accuracy"] = float(np.trace(sums["confusion"])) / count
  else:
    out["perplexity"] = math.exp(min(loss, 700.0))
    out["bits_per_byte"] = loss / math.log(2)  # Tokens are bytes, so nats/token / ln 2 = bits/byte.
  return out


def evaluate_checkpoint(path: str, step: int | None = None) -> dict[str, float]:
  """Re-evaluates a saved step (`jaxcollab eval`) on this process's first device."""
  _, variables, config = reload.load(path, step)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1  # Any saved mesh fits one device.
  run = run_lib.build(config, devices=jax.local_devices()[:1])
  return summarize(Evaluator(run).sums(variables["params"], variables.get("batch_stats", {})))
