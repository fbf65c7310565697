"""The classic classifier: flatten -> Dense(hidden) -> activation -> Dense(classes)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcollab.errors import ConfigError
from jaxcollab.models import activations

# Shape letters: B batch, H/W/C image height/width/channels, N hidden width, K classes.

TASK = "image"
# Config keys behind the logical axis names, named when a mesh cannot split that axis.
AXIS_KEYS = {"hidden": "model.hidden", "embed": "the flattened image size"}


def config_fields() -> ml_collections.ConfigDict:
  """The model.* keys the MLP reads besides name, activation and dtype, with their defaults."""
  c = ml_collections.ConfigDict()
  c.hidden = 1024  # int > 0: width of the hidden Dense layer.
  return c


def check(model: ml_collections.ConfigDict, dataset: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a value the MLP cannot use."""
  del dataset  # Any image size works.
  if model.hidden <= 0:
    raise ConfigError(f"model.hidden must be a positive integer, got {model.hidden}.")


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
