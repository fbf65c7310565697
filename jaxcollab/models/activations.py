"""Activation functions by name, the values `model.activation` may take."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
  """The activation called `name`, or a ValueError listing the valid names."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}.")
  return ACTIVATIONS[name]
