"""Activation functions by name, the values `model.activation` may take."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxcollab import config as config_lib


def identity(x: jax.Array) -> jax.Array:
  """Returns `x` unchanged (the linear-model ablation)."""
  return x


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "gelu": jax.nn.gelu,  # tanh approximation, as GPT-2 uses.
  "tanh": jnp.tanh,
  "sigmoid": jax.nn.sigmoid,
  "silu": jax.nn.silu,
  "elu": jax.nn.elu,
  "leaky_relu": jax.nn.leaky_relu,  # negative slope 0.01.
  "softplus": jax.nn.softplus,
  "swish": jax.nn.silu,  # Another name for silu (x * sigmoid(x)); kept because papers use both.
  "identity": identity,
}


def get(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called `name`, or a ConfigError listing the valid names."""
  return config_lib.lookup(ACTIVATIONS, "model.activation", name)
