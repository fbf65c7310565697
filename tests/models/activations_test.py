"""Activations: every name the config lists exists, is finite and is its own function."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab import config as config_lib
from jaxcollab.models import activations
from jaxcollab.models import mlp as mlp_lib

ALIASES = {frozenset({"silu", "swish"})}  # Two names for x * sigmoid(x), equal on purpose.


def test_registry_lists_exactly_the_names_the_config_documents():
  source = open(config_lib.__file__).read()
  line = next(l for l in source.splitlines() if "c.model.activation =" in l)
  documented = {name.strip() for name in line.split("#", 1)[1].split("|")}
  assert documented == set(activations.ACTIVATIONS)


def test_each_activation_is_finite_and_distinct():
  x = jnp.linspace(-6.0, 6.0, 101)
  outs = {name: np.asarray(f(x)) for name, f in activations.ACTIVATIONS.items()}
  for name, y in outs.items():
    assert y.shape == x.shape and np.isfinite(y).all(), name
  for a, b in itertools.combinations(outs, 2):
    same = np.allclose(outs[a], outs[b])
    assert same == (frozenset({a, b}) in ALIASES), (a, b)


@pytest.mark.parametrize("name", sorted(activations.ACTIVATIONS))
def test_each_activation_drives_a_model(name):
  model = mlp_lib.MLP(mlp_lib.MLPConfig(4, hidden=16, activation=name))
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  logits = model.apply(model.init({"params": jax.random.key(1)}, x, train=False), x, train=False)
  assert logits.shape == (3, 4) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_unknown_activation_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown model.activation 'rleu'.*relu"):
    activations.get("rleu")
