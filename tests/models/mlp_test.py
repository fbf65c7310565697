"""MLP: exact sizes and that the configured width and activation are used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab.models import mlp as mlp_lib


def count(config: mlp_lib.MLPConfig, image_shape) -> int:
  model = mlp_lib.MLP(config)
  x = jnp.zeros((1, *image_shape))
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))["params"]
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
  "image_shape, hidden, expected",
  [
    ((8, 8, 1), 1024, 64 * 1024 + 1024 + 1024 * 10 + 10),  # digits: 76,810
    ((28, 28, 1), 1024, 784 * 1024 + 1024 + 1024 * 10 + 10),  # mnist: 814,090
    ((8, 8, 1), 16, 64 * 16 + 16 + 16 * 10 + 10),
  ],
)
def test_parameter_count(image_shape, hidden, expected):
  assert count(mlp_lib.MLPConfig(10, hidden=hidden), image_shape) == expected


def test_digits_default_count_is_76810():
  assert count(mlp_lib.MLPConfig(10), (8, 8, 1)) == 76_810


def test_identity_activation_makes_the_model_linear():
  model = mlp_lib.MLP(mlp_lib.MLPConfig(3, hidden=8, activation="identity"))
  x, y = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 1))
  variables = model.init({"params": jax.random.key(1)}, x, train=False)
  f = lambda x: model.apply(variables, x, train=False)
  np.testing.assert_allclose(f(x + y) - f(y), f(x) - f(jnp.zeros_like(x)), rtol=1e-4, atol=1e-5)
  relu = mlp_lib.MLP(mlp_lib.MLPConfig(3, hidden=8, activation="relu"))
  g = lambda x: relu.apply(variables, x, train=False)
  assert not np.allclose(g(x + y) - g(y), g(x) - g(jnp.zeros_like(x)), atol=1e-3)
