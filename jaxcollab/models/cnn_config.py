"""The CNN's config part: its task, config keys and their checks, importable before jax."""

from __future__ import annotations

import ml_collections

from jaxcollab.errors import ConfigError

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
