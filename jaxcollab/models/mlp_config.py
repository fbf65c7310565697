"""The MLP's config part: its task, config keys and their checks, importable before jax."""

from __future__ import annotations

import ml_collections

from jaxcollab.errors import ConfigError

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
