"""Models by name: one file each, found through `MODELS`; the experiment config stops here.

A model file `models/<name>.py` declares, beside its flax module, its config part:
  TASK             "image" (float32 images [B, H, W, C] -> logits [B, classes]) or "text"
                   (int32 tokens [B, L] -> logits [B, L, V]); modules take `(x, train: bool)`.
  config_fields()  the model.* keys it reads besides name/activation/dtype, with defaults and comments.
  check(model, dataset)  ConfigError for values it cannot use.
  make(model, info, dtype)  the flax module, built from a small frozen dataclass (never the config).
  AXIS_KEYS        config keys behind its logical axis names, for sharding error messages.
Adding a model is that file plus one line in `MODELS` (README, "Add a model").

The config part (TASK, config_fields, check, AXIS_KEYS, PORTABLE) may instead live in a jax-free
`<name>_config.py` beside the model file, which then re-exports it; the built-in models do so, and
this module imports no jax or flax, so a mistake in a model's keys is reported before jax starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Collection
from types import ModuleType
from typing import Any, TypeAlias

import ml_collections
import ml_dtypes
import numpy as np

from jaxcollab import choices
from jaxcollab import config as config_lib
from jaxcollab.errors import ConfigError

ConfigDict: TypeAlias = ml_collections.ConfigDict

# model.name -> the module that defines it (big_vision style); a model outside this package can be
# registered the same way, e.g. MODELS["linear"] = "mypackage.linear".
MODELS: dict[str, str] = {
  "mlp": "jaxcollab.models.mlp",
  "cnn": "jaxcollab.models.cnn",
  "resnet": "jaxcollab.models.resnet",
  "gpt": "jaxcollab.models.gpt",
}
# numpy's and ml_dtypes' types, which jax.numpy's float32 and bfloat16 wrap: no jax needed here.
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def get(name: str) -> ModuleType:
  """The model file registered as `name` (imports its flax module, and so jax)."""
  return importlib.import_module(config_lib.lookup(MODELS, "model.name", name))


def config_part(name: str) -> ModuleType:
  """Model `name`'s TASK, config_fields, check, AXIS_KEYS, PORTABLE: its `<module>_config`, else its file."""
  module = config_lib.lookup(MODELS, "model.name", name)
  try:
    separate = importlib.util.find_spec(f"{module}_config") is not None
  except ModuleNotFoundError:  # No such package: importing the model file below says so.
    separate = False
  return importlib.import_module(f"{module}_config" if separate else module)


def resolve(config: ConfigDict, overridden: Collection[str] = (), drop_unread: bool = False) -> ConfigDict:
  """`config` with the chosen model's fields completed from its defaults, type-checked and checked.

  A model key the model does not read is an error when the user set it (`overridden`) or the
  experiment set it for this model; when the model itself was switched on the command line (or
  `drop_unread`, for configs saved by older versions), another model's keys are dropped.
  """
  config = ConfigDict(config.to_dict())
  module = config_part(config.model.name)
  choices.lookup(choices.ACTIVATIONS, "model.activation", config.model.activation)
  fields = module.config_fields()
  unread = [k for k in config.model if k not in fields and k not in config_lib.SHARED_MODEL_KEYS]
  switched = "model.name" in overridden or drop_unread
  for key in unread:
    if f"model.{key}" in overridden or not switched:
      raise ConfigError(
        f"Model {config.model.name!r} does not read model.{key}; its keys are "
        f"{', '.join(f'model.{k}' for k in (*config_lib.SHARED_MODEL_KEYS, *fields))}."
      )
  if unread:
    logging.info("Model %r does not read %s; dropped.", config.model.name, ", ".join(f"model.{k}" for k in unread))
  values = {k: config.model[k] for k in config_lib.SHARED_MODEL_KEYS}
  for key, default in fields.items():
    values[key] = config_lib.coerce(f"model.{key}", config.model[key], default) if key in config.model else default
  config.model = ConfigDict(values)
  module.check(config.model, config.dataset)
  return config


def _portable_values(name: str) -> dict[str, Any]:
  return getattr(config_part(name), "PORTABLE", {})


def portable_keys(name: str) -> tuple[str, ...]:
  """Model `name`'s PORTABLE keys as config paths ("model.attention"): they may differ on resume."""
  return tuple(f"model.{k}" for k in _portable_values(name))


def portable(config: ConfigDict) -> ConfigDict:
  """A saved config made readable on any machine: the model's PORTABLE keys (kernel choices such as
  the GPT's attention, which change speed, not results) take their machine-independent values."""
  config = ConfigDict(config.to_dict())
  for key, value in _portable_values(config.model.name).items():
    if key in config.model:
      config.model[key] = value
  return config


def build(config: ConfigDict, info: Any) -> Any:
  """The module that `config.model.name` names, built for the dataset described by `info`."""
  # Checked against the dataset it is built for (a saved run's, or a test's), not config.dataset.
  dataset = ConfigDict(config.dataset.to_dict())
  dataset.seq_len = info.seq_len or 0
  model = resolve(ConfigDict({**config.to_dict(), "dataset": dataset.to_dict()}), drop_unread=True).model
  return get(model.name).make(model, info, DTYPES[model.dtype])


__all__ = ["DTYPES", "MODELS", "build", "config_part", "get", "portable", "resolve"]
