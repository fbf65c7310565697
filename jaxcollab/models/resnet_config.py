"""The ResNet's config part: its task, config keys and their checks, importable before jax."""

from __future__ import annotations

import ml_collections

from jaxcollab.errors import ConfigError

TASK = "image"
# Config keys behind the logical axis names, named when a mesh cannot split that axis.
AXIS_KEYS = {"conv_out": "model.width times the stage multipliers"}
STEMS = ("cifar", "imagenet")


def config_fields() -> ml_collections.ConfigDict:
  """The model.* keys the ResNet reads besides name, activation and dtype, with their defaults."""
  c = ml_collections.ConfigDict()
  c.depth = 18  # 18 | 34 | 50
  c.width = 64  # int > 0: channels of the first stage (doubled at each of the next three).
  c.stem = "cifar"  # cifar (3x3 conv) | imagenet (7x7/2 conv + max-pool)
  return c


def check(model: ml_collections.ConfigDict, dataset: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a value the ResNet cannot use."""
  del dataset  # Any image size works.
  if model.depth not in STAGES:
    raise ConfigError(f"model.depth must be 18, 34 or 50, got {model.depth}.")
  if model.width <= 0:
    raise ConfigError(f"model.width must be a positive integer, got {model.width}.")
  if model.stem not in STEMS:
    raise ConfigError(f"model.stem must be 'cifar' or 'imagenet', got {model.stem!r}.")


# depth -> (block kind, blocks per stage); the four stages double the width each time.
STAGES: dict[int, tuple[str, tuple[int, ...]]] = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
}
