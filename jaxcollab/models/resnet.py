"""ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks) with BatchNorm, torchvision layout.

BatchNorm running statistics live in the `batch_stats` collection: `apply(..., train=True,
mutable=["batch_stats"])` updates them, `train=False` normalises with them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcollab.models import activations
from jaxcollab.models.resnet_config import STAGES

# Its config part (TASK, config_fields, check, AXIS_KEYS) is resnet_config.py, which imports no jax, so
# a mistake in the model's keys is reported before jax starts (jaxcollab/models/__init__.py).
# Shape letters: B batch, H/W height/width, C channels, K classes.


def make(model: ml_collections.ConfigDict, info: Any, dtype: Any) -> ResNet:
  """ResNet-{18,34,50} with model.width first-stage channels and a cifar or imagenet stem."""
  return ResNet(ResNetConfig(info.num_classes, int(model.depth), int(model.width), model.stem, model.activation, dtype))


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """What the ResNet needs from the experiment config."""

  num_classes: int
  depth: int = 18
  width: int = 64
  stem: str = "cifar"  # cifar: 3x3/1 conv; imagenet: 7x7/2 conv + 3x3/2 max-pool.
  activation: str = "relu"
  dtype: Any = jnp.float32  # Compute dtype; parameters and batch statistics stay float32.


def _conv(features: int, size: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  # Symmetric padding (size // 2) as in torchvision; "SAME" would shift strided windows by one pixel.
  pad = size // 2
  return nn.Conv(
    features,
    (size, size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,  # BatchNorm follows every conv, so a bias would be redundant.
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.variance_scaling(2.0, "fan_out", "normal"), (None, None, "conv_in", "conv_out")
    ),
    name=name,
  )


def _norm(train: bool, dtype: Any, name: str, zero: bool = False) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    # The last BN of a residual branch starts at zero so each block begins as the identity
    # (Goyal et al. 2017, as in flax examples/imagenet); it trains faster and changes no count.
    scale_init=nn.with_logical_partitioning(
      nn.initializers.zeros_init() if zero else nn.initializers.ones_init(), ("norm",)
    ),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs; the first may downsample."""

  features: int
  stride: int
  act: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(_norm, train, self.dtype)
    h = self.act(norm("bn1")(_conv(self.features, 3, self.stride, self.dtype, "conv1")(x_BxHxWxC)))
    h = norm("bn2", zero=True)(_conv(self.features, 3, 1, self.dtype, "conv2")(h))
    return self.act(h + _shortcut(self, x_BxHxWxC, train))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, torchvision v1.5), 1x1 expand by 4."""

  features: int
  stride: int
  act: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(_norm, train, self.dtype)
    h = self.act(norm("bn1")(_conv(self.features, 1, 1, self.dtype, "conv1")(x_BxHxWxC)))
    h = self.act(norm("bn2")(_conv(self.features, 3, self.stride, self.dtype, "conv2")(h)))
    h = norm("bn3", zero=True)(_conv(self.features * 4, 1, 1, self.dtype, "conv3")(h))
    return self.act(h + _shortcut(self, x_BxHxWxC, train))


def _shortcut(block: BasicBlock | Bottleneck, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
  """Identity, or a 1x1 conv + BN projection where the shape changes (called inside a compact block)."""
  out = block.features * block.expansion
  if block.stride == 1 and x_BxHxWxC.shape[-1] == out:
    return x_BxHxWxC
  x = _conv(out, 1, block.stride, block.dtype, "shortcut_conv")(x_BxHxWxC)
  return _norm(train, block.dtype, "shortcut_bn")(x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """Stem, four stages of residual blocks, global average pool, linear classifier."""

  config: ResNetConfig

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    c = self.config
    if c.depth not in STAGES:
      raise ValueError(f"ResNet depth {c.depth} is not supported; choose one of {sorted(STAGES)}.")
    act = activations.get(c.activation)
    kind, counts = STAGES[c.depth]
    x = x_BxHxWxC.astype(c.dtype)
    if c.stem == "imagenet":
      x = act(_norm(train, c.dtype, "stem_bn")(_conv(c.width, 7, 2, c.dtype, "stem_conv")(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif c.stem == "cifar":
      x = act(_norm(train, c.dtype, "stem_bn")(_conv(c.width, 3, 1, c.dtype, "stem_conv")(x)))
    else:
      raise ValueError(f"ResNet stem {c.stem!r} is not supported; choose 'cifar' or 'imagenet'.")
    for stage, count in enumerate(counts):
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        x = BLOCKS[kind](c.width * 2**stage, stride, act, c.dtype, name=f"stage{stage + 1}_block{i + 1}")(x, train)
    x_BxC = jnp.mean(x, axis=(1, 2))
    logits_BxK = nn.Dense(
      c.num_classes,
      dtype=c.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "classes")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
      name="head",
    )(x_BxC)
    return logits_BxK.astype(jnp.float32)
