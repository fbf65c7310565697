"""One run's parts: the resolved config, the TrainState, the model's forward pass, and `build`.

Training, evaluation, sweeps and reloading all start here; nothing in this module trains,
evaluates or writes files, so `jaxcollab.load` can use it without the training stack.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcollab import config as config_lib
from jaxcollab import data, losses, models, optim, sharding
from jaxcollab.config import ConfigDict
from jaxcollab.data import augment
from jaxcollab.schema import resolve  # Checks the config before jax starts; run.resolve for callers.

PyTree = Any
Batch = dict[str, Any]


def variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  """The variables dict a module's `apply` takes (BatchNorm statistics only where the model has them)."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; static fields hold the functions that use it."""

  step: jax.Array  # int32 scalar: micro-steps taken.
  params: PyTree
  opt_state: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm.
  rng: jax.Array  # uint32[2]: raw key data (plain array, so checkpoints restore without jaxcollab).
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  loss_fn: Callable = flax.struct.field(pytree_node=False)
  lr_fn: Callable = flax.struct.field(pytree_node=False)

  def variables(self) -> dict[str, PyTree]:
    """The model variables that `apply_fn` takes."""
    return variables(self.params, self.batch_stats)


def model_input(batch: Batch) -> jax.Array:
  """Images for classifiers, input tokens for language models."""
  return batch["image"] if "image" in batch else batch["inputs"]


def example_batch(info: data.DatasetInfo) -> dict[str, np.ndarray]:
  """A one-example batch of zeros with the dataset's shapes and dtypes."""
  if info.kind == "image":
    assert info.image_shape is not None
    return {
      "image": np.zeros((1, *info.image_shape), np.float32),
      "label": np.zeros((1,), np.int32),
      "mask": np.ones((1,), np.float32),
    }
  assert info.seq_len is not None
  return {
    "inputs": np.zeros((1, info.seq_len), np.int32),
    "targets": np.zeros((1, info.seq_len), np.int32),
    "mask": np.ones((1, info.seq_len), np.float32),
  }


def abstract_batch(
  info: data.DatasetInfo, batch_size: int, batch_sharding: jax.sharding.Sharding, augments: bool = False
) -> PyTree:
  """Shapes, dtypes and sharding of a global batch of `batch_size`, for compiling before the first batch exists.

  `augments`: a train batch carrying augmentation draws (`Dataset.augments`).
  """
  example = example_batch(info)
  if augments:
    example[augment.KEY] = augment.draws(0, np.zeros(1, np.int64), example["image"].shape[1])
  return {
    k: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype, sharding=batch_sharding) for k, x in example.items()
  }


def init_variables(model: nn.Module, info: data.DatasetInfo, seed: int) -> PyTree:
  """The model's variables as initialised from `seed`, with their logical-partitioning boxes."""
  return model.init({"params": jax.random.PRNGKey(seed)}, model_input(example_batch(info)), train=False)


def forward(
  state: TrainState, params: PyTree, batch: Batch, is_training: bool, rng: jax.Array | None = None
) -> tuple[jax.Array, PyTree]:
  """Logits and updated BatchNorm statistics (unchanged unless training a BatchNorm model)."""
  mutable = ["batch_stats"] if is_training and state.batch_stats else False
  rngs = {"dropout": rng} if rng is not None else None
  out = state.apply_fn(
    variables(params, state.batch_stats), model_input(batch), train=is_training, rngs=rngs, mutable=mutable
  )
  if mutable:
    logits, updates = out
    return logits, updates["batch_stats"]
  return out, state.batch_stats


@dataclasses.dataclass
class Run:
  """What a run is built from; shared by training, evaluation and reloading."""

  config: ConfigDict
  dataset: data.Dataset
  model: nn.Module
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  abstract_state: TrainState  # ShapeDtypeStruct leaves: shapes, dtypes and functions, no arrays.
  shardings: TrainState
  init_fn: Callable[[], TrainState]

  def init_state(self) -> TrainState:
    """The initial state, born sharded: every device makes only its own shard."""
    return sharding.create_sharded(self.init_fn, self.shardings)

  def init_state_ahead(self) -> Callable[[], TrainState]:
    """`init_state` compiling on a thread from now; call the result for the state."""
    return sharding.create_sharded_ahead(self.init_fn, self.shardings)


def build(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Run:
  """Checks the config and layout, then makes the dataset, model, mesh and abstract sharded state.

  Nothing compiles here: every impossible layout is a `UserError` before the first jit. Model keys
  that the chosen model does not read are dropped with a notice here; the CLI refuses them earlier,
  in `resolve`, when the user set them.
  """
  config = resolve(config, drop_unread=True)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.parse_rules(config.mesh.rules)
  sharding.check_batch(config.train.batch_size, mesh)
  processes = len({d.process_index for d in mesh.devices.flat})
  if processes > 1:
    sharding.check_same_across_processes(config_lib.to_json(config), "The config")
  dataset = data.get_dataset(config)
  # An eval batch larger than the split would only pad it (10M rows took minutes and 41 GB): clamp it to
  # the smallest batch that still splits over the devices and covers the split in one step.
  ways = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], processes)
  whole = -(-dataset.info.eval_size // ways) * ways
  if config.train.eval_batch_size > whole:
    logging.info(
      "train.eval_batch_size=%d exceeds the %d examples of the eval split; using %d.",
      config.train.eval_batch_size,
      dataset.info.eval_size,
      whole,
    )
    config.train.eval_batch_size = whole
  sharding.check_batch(config.train.eval_batch_size, mesh, key="train.eval_batch_size")
  model = models.build(config, dataset.info)
  tx, lr_fn = optim.make_optimizer(config.optimizer, config.train.steps)
  accumulate = config.optimizer.accumulate_steps
  loss_fn = losses.get_loss(config.loss)
  # One function for every state this run makes: a static field, so it is part of the state's tree structure.
  step_lr_fn = lambda step: lr_fn(step // accumulate)

  def boxed_variables() -> PyTree:
    return init_variables(model, dataset.info, config.seed)

  def state_of(boxed: PyTree) -> TrainState:
    unboxed = nn.unbox(boxed)
    params = unboxed["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      batch_stats=unboxed.get("batch_stats", {}),
      rng=jax.random.PRNGKey(config.seed + 1),
      apply_fn=model.apply,
      tx=tx,
      loss_fn=loss_fn,
      lr_fn=step_lr_fn,
    )

  def init_fn() -> TrainState:
    return state_of(boxed_variables())

  # The model's init is traced once here (~0.1 s of a GPT's start-up each time), for its specs and the state.
  boxed = jax.eval_shape(boxed_variables)
  param_specs = sharding.logical_specs(boxed)["params"]
  abstract = jax.eval_shape(state_of, boxed)
  sharding.check_params(param_specs, abstract.params, mesh, rules, models.config_part(config.model.name).AXIS_KEYS)
  shardings = sharding.to_shardings(sharding.state_specs(abstract, param_specs), mesh, rules)
  return Run(config, dataset, model, mesh, rules, abstract, shardings, init_fn)
