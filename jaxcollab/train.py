"""Training: the TrainState, a pure `train_step`, and the loop that orchestrates them."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import optax

PyTree = Any


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
