"""The jax-free names of each registry are exactly the names its registry of functions holds."""

import pytest

from jaxcollab import checkpoint, choices, data, losses, optim
from jaxcollab.errors import ConfigError
from jaxcollab.models import activations


def test_names_match_the_registries():
  assert set(choices.ACTIVATIONS) == set(activations.ACTIVATIONS)
  assert set(choices.LOSSES) == set(losses.LOSSES)
  assert set(choices.TEXT_LOSSES) <= set(choices.LOSSES)
  assert set(choices.OPTIMIZERS) == set(optim.OPTIMIZERS)
  assert set(choices.SCHEDULES) == set(optim.SCHEDULES)
  assert data.DATASETS is choices.DATASETS
  assert checkpoint.EVAL_METRICS is choices.EVAL_METRICS


def test_lookup_names_the_key_and_the_closest_name():
  assert choices.lookup(choices.LOSSES, "loss.name", "mse") == "mse"
  message = (
    "Unknown loss.name 'mes' (did you mean 'mse'?); choose one of cross_entropy, label_smoothing, mse, next_token."
  )
  with pytest.raises(ConfigError) as e:
    choices.lookup(choices.LOSSES, "loss.name", "mes")
  assert str(e.value) == message
