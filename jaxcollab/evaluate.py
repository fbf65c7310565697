"""Evaluation: sums over the whole eval split on the devices, then loss, accuracy, perplexity, reports."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcollab import metrics, sharding

PyTree = Any


class Evaluator:
  """Evaluates parameters of a run on its eval split; every example counts exactly once."""

  def __init__(self, run):
    self.run = run
    self.info = run.dataset.info
    self._last: tuple[int, dict[str, np.ndarray]] | None = None  # (step, sums) of the newest evaluation.
    self.stop = None  # A jaxcollab.stop.Stop whose signal abandons an evaluation at the next batch.
    config = run.config
    self.per_process = config.train.eval_batch_size // jax.process_count()
    self.batch_sharding = sharding.batch_sharding(run.mesh)
    classes = self.info.num_classes if self.info.kind == "image" else 0
    loss_fn = run.state.loss_fn
    apply_fn = run.state.apply_fn

    def eval_step(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
      variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
      x = batch["image"] if "image" in batch else batch["inputs"]
      with sharding.activation_context(run.mesh, run.rules):  # Resolves the models' activation constraints.
        logits = apply_fn(variables, x, train=False)
      mask = batch["mask"]
      sums = {"loss": jnp.sum(loss_fn(logits, batch) * mask), "count": jnp.sum(mask)}
      if classes:
        pred = jnp.argmax(logits, -1)
        true_BxC = jax.nn.one_hot(batch["label"], classes) * mask[:, None]
        sums["confusion"] = true_BxC.T @ jax.nn.one_hot(pred, classes)  # rows: true class, cols: predicted.
      return sums

    replicated = NamedSharding(run.mesh, P())  # Every process can read the sums.
    self._step = jax.jit(
        eval_step,
        in_shardings=(run.shardings.params, run.shardings.batch_stats, self.batch_sharding),
        out_shardings=replicated,
    )

  def sums(self, params: PyTree, batch_stats: PyTree) -> dict[str, np.ndarray]:
    """Loss sum, example (or token) count and confusion matrix over the whole eval split."""
    totals = None
    for local in self.run.dataset.eval_batches(batch_size=self.per_process, process_index=jax.process_index(),
                                               process_count=jax.process_count()):
      if self.stop is not None:
        self.stop.check()
      out = self._step(params, batch_stats, sharding.to_global(local, self.batch_sharding))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}

  def _state_sums(self, state) -> dict[str, np.ndarray]:
    # The loop evaluates at the last step and then asks for the final report of the same state:
    # remember the sums by step so the eval split is not run twice.
    step = int(jax.device_get(state.step))
    if self._last is None or self._last[0] != step:
      self._last = (step, self.sums(state.params, state.batch_stats))
    return self._last[1]

  def evaluate(self, state) -> dict[str, float]:
    """loss and accuracy (classifiers) or loss, perplexity and bits_per_byte (LMs)."""
    return summarize(self._state_sums(state))

  def final_report(self, state, workdir: str, write: bool = True) -> dict[str, float]:
    """Final metrics; for classifiers also per-class precision/recall/F1 and a confusion-matrix PNG."""
    sums = self._state_sums(state)
    result = summarize(sums)
    if "confusion" in sums and write:
      confusion = sums["confusion"].astype(np.int64)
      report = metrics.classification_report(confusion)
      plots = os.path.join(workdir, "plots")
      os.makedirs(plots, exist_ok=True)
      metrics.plot_confusion(confusion, os.path.join(plots, "confusion.png"),
                             title=f"{self.info.name} {self.info.eval_split}: accuracy {result['accuracy']:.4f}")
      with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump({"split": self.info.eval_split, "metrics": result, **report,
                   "confusion": confusion.tolist()}, f, indent=2)
      print(metrics.format_report(report))
    return result


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
  from jaxcollab import reload, train  # pylint: disable=g-import-not-at-top

  _, variables, config = reload.load(path, step)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1  # Any saved mesh fits one device.
  run = train.build(config, devices=jax.local_devices()[:1])
  return summarize(Evaluator(run).sums(variables["params"], variables.get("batch_stats", {})))
