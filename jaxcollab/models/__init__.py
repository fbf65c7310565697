"""Models by name: each factory turns `config.model` into a small frozen dataclass and a flax module.

The experiment config stops here: modules see only their dataclass (MLPConfig, CNNConfig,
ResNetConfig, GPTConfig). Every module takes `(x, train: bool)`, where x is float32 images
[B, H, W, C] or int32 tokens [B, L], and returns float32 logits ([B, classes] or [B, L, V]).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxcollab.models import gpt as gpt_lib
from jaxcollab.models.activations import ACTIVATIONS
from jaxcollab.models.cnn import CNN, CNNConfig
from jaxcollab.models.gpt import GPT, GPT_SIZES, GPTConfig
from jaxcollab.models.mlp import MLP, MLPConfig
from jaxcollab.models.resnet import ResNet, ResNetConfig

ConfigDict = ml_collections.ConfigDict
ModelFactory = Callable[[ConfigDict, Any], nn.Module]  # (config.model, DatasetInfo) -> module

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GPT_FIELDS = ("num_layers", "num_heads", "embed_dim", "mlp_dim", "context")


def _dtype(model_config: ConfigDict) -> Any:
  if model_config.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {model_config.dtype!r}.")
  return DTYPES[model_config.dtype]


def gpt_dims(model_config: ConfigDict) -> dict[str, int]:
  """GPT shape fields: from GPT_SIZES[model.size] when a size is named, else from the model fields."""
  size = model_config.get("size", "")
  if size:
    if size not in GPT_SIZES:
      raise ValueError(f"Unknown model.size {size!r}; choose one of {', '.join(sorted(GPT_SIZES))}.")
    return dict(GPT_SIZES[size])
  return {k: int(model_config[k]) for k in GPT_FIELDS}


def _mlp(model_config: ConfigDict, info: Any) -> MLP:
  """flatten -> Dense(model.hidden) -> activation -> Dense(classes)."""
  return MLP(MLPConfig(info.num_classes, int(model_config.hidden), model_config.activation, _dtype(model_config)))


def _cnn(model_config: ConfigDict, info: Any) -> CNN:
  """model.features conv layers, each with 2x2 average pooling, then Dense(model.dense) and the head."""
  features = tuple(int(f) for f in model_config.features)
  return CNN(CNNConfig(info.num_classes, features, int(model_config.dense), model_config.activation,
                       _dtype(model_config)))


def _resnet(model_config: ConfigDict, info: Any) -> ResNet:
  """ResNet-{18,34,50} with model.width first-stage channels and a cifar or imagenet stem."""
  return ResNet(ResNetConfig(info.num_classes, int(model_config.depth), int(model_config.width), model_config.stem,
                             model_config.activation, _dtype(model_config)))


def _gpt(model_config: ConfigDict, info: Any) -> GPT:
  """GPT-2-style LM over info.vocab_size tokens, sized by model.size or the explicit fields."""
  dims, dtype = gpt_dims(model_config), _dtype(model_config)
  platform, capability = gpt_lib.current_platform()
  attention = gpt_lib.attention_implementation(model_config.get("attention", "auto"), platform, dtype,
                                               dims["embed_dim"] // dims["num_heads"], capability)
  return GPT(GPTConfig(
      vocab_size=int(info.vocab_size),
      **dims,
      dropout=float(model_config.dropout),
      activation=model_config.activation,
      tied=bool(model_config.tied),
      remat=bool(model_config.remat),
      dtype=dtype,
      attention=attention,
      scan_layers=bool(model_config.get("scan_layers", False)),
  ))


# Factories are private so that `jaxcollab.models.gpt` etc. stay the submodules.
MODELS: dict[str, ModelFactory] = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet, "gpt": _gpt}


def build(config: ConfigDict, info: Any) -> nn.Module:
  """The module that `config.model.name` names, built for the dataset described by `info`."""
  name = config.model.name
  if name not in MODELS:
    raise ValueError(f"Unknown model.name {name!r}; choose one of {', '.join(sorted(MODELS))}.")
  return MODELS[name](config.model, info)


__all__ = [
    "ACTIVATIONS", "CNN", "CNNConfig", "GPT", "GPTConfig", "GPT_SIZES", "MLP", "MLPConfig", "MODELS",
    "ResNet", "ResNetConfig", "build", "gpt_dims",
]
