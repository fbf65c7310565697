"""The classic classifier: flatten -> Dense(hidden) -> activation -> Dense(classes)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcollab.models import activations

# Its config part (TASK, config_fields, check, AXIS_KEYS) is mlp_config.py, which imports no jax, so
# a mistake in the model's keys is reported before jax starts (jaxcollab/models/__init__.py).
# Shape letters: B batch, H/W/C image height/width/channels, N hidden width, K classes.


def make(model: ml_collections.ConfigDict, info: Any, dtype: Any) -> MLP:
  """flatten -> Dense(model.hidden) -> activation -> Dense(classes)."""
  return MLP(MLPConfig(info.num_classes, int(model.hidden), model.activation, dtype))


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """What the MLP needs from the experiment config."""

  num_classes: int
  hidden: int = 1024
  activation: str = "relu"
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.


class MLP(nn.Module):
  """One hidden layer; the hidden axis is split over `tensor` (column- then row-parallel)."""

  config: MLPConfig

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    del train  # Nothing behaves differently in training.
    c = self.config
    dense = lambda features, names, name: nn.Dense(
      features,
      dtype=c.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
      name=name,
    )
    x_BxF = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    h_BxN = activations.get(c.activation)(dense(c.hidden, ("embed", "hidden"), "hidden")(x_BxF))
    logits_BxK = dense(c.num_classes, ("hidden", "classes"), "head")(h_BxN)
    return logits_BxK.astype(jnp.float32)
