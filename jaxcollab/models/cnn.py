"""A small conv net in the style of flax examples/mnist: [conv3x3 -> act -> avgpool2]* -> dense -> head."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcollab.errors import ConfigError
from jaxcollab.models import activations

# Shape letters: B batch, H/W/C height/width/channels, F flattened features, N dense width, K classes.

TASK = "image"
# Config keys behind the logical axis names, named when a mesh cannot split that axis.
AXIS_KEYS = {"conv_out": "model.features", "hidden": "model.dense", "embed": "the flattened conv features"}


def config_fields() -> ml_collections.ConfigDict:
  """The model.* keys the CNN reads besides name, activation and dtype, with their defaults."""
  c = ml_collections.ConfigDict()
  c.features = (32, 64)  # tuple of ints > 0: output channels of each 3x3 conv (each followed by 2x2 avg-pool).
  c.dense = 256  # int > 0: width of the Dense layer after the conv stack.
  return c


def check(model: ml_collections.ConfigDict, dataset: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a value the CNN cannot use."""
  del dataset  # Any image size works.
  if not model.features or any(f <= 0 for f in model.features):
    raise ConfigError(f"model.features must be a non-empty tuple of positive ints, got {model.features}.")
  if model.dense <= 0:
    raise ConfigError(f"model.dense must be a positive integer, got {model.dense}.")


def make(model: ml_collections.ConfigDict, info: Any, dtype: Any) -> CNN:
  """model.features conv layers, each with 2x2 average pooling, then Dense(model.dense) and the head."""
  return CNN(
    CNNConfig(info.num_classes, tuple(int(f) for f in model.features), int(model.dense), model.activation, dtype)
  )


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """What the CNN needs from the experiment config."""

  num_classes: int
  features: tuple[int, ...] = (32, 64)
  dense: int = 256
  activation: str = "relu"
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


class CNN(nn.Module):
  """Conv stack then a two-layer classifier head; each pool halves height and width."""

  config: CNNConfig

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    del train  # Nothing behaves differently in training.
    c = self.config
    act = activations.get(c.activation)
    x = x_BxHxWxC
    for i, features in enumerate(c.features):
      x = nn.Conv(
        features,
        (3, 3),
        padding="SAME",
        dtype=c.dtype,
        param_dtype=jnp.float32,
        # Spatial kernel axes are tiny (3x3), so they are never sharded.
        kernel_init=_part(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
        bias_init=_part(nn.initializers.zeros_init(), ("conv_out",)),
        name=f"conv_{i}",
      )(x)
      x = nn.avg_pool(act(x), (2, 2), strides=(2, 2))
    x_BxF = x.reshape(x.shape[0], -1)
    dense = lambda features, names, name: nn.Dense(
      features,
      dtype=c.dtype,
      param_dtype=jnp.float32,
      kernel_init=_part(nn.initializers.lecun_normal(), names),
      bias_init=_part(nn.initializers.zeros_init(), names[1:]),
      name=name,
    )
    h_BxN = act(dense(c.dense, ("embed", "hidden"), "dense")(x_BxF))
    return dense(c.num_classes, ("hidden", "classes"), "head")(h_BxN).astype(jnp.float32)
