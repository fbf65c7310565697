"""A small conv net in the style of flax examples/mnist: [conv3x3 -> act -> avgpool2]* -> dense -> head."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcollab.models import activations

# Its config part (TASK, config_fields, check, AXIS_KEYS) is cnn_config.py, which imports no jax, so
# a mistake in the model's keys is reported before jax starts (jaxcollab/models/__init__.py).
# Shape letters: B batch, H/W/C height/width/channels, F flattened features, N dense width, K classes.


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
