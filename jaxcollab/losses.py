"""Losses by name: each returns per-example (or per-token) losses that the caller masks and averages.

A loss function has the signature `loss_fn(logits, batch) -> losses` with `losses.shape ==
batch["mask"].shape`; the training step computes `sum(losses * mask) / sum(mask)`. Labels are
integers; any one-hot encoding happens here. Everything is computed in float32, whatever the
model's compute dtype.

Shapes: B = batch, C = classes, L = sequence length, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxcollab import config as config_lib

LossFn = Callable[[jax.Array, dict], jax.Array]


def _logits_and_labels(logits: jax.Array, batch: dict, key: str) -> tuple[jax.Array, jax.Array]:
  """float32 logits shaped labels.shape + (classes,); labels zeroed where the mask is off."""
  labels = batch[key]
  if logits.shape[:-1] != labels.shape:
    # The GPT may keep its residual stream 2-D ([B*L, V]); any layout with the right size works.
    if logits.size != labels.size * logits.shape[-1]:
      raise ValueError(
        f"Logits of shape {logits.shape} do not match batch[{key!r}] of shape {labels.shape}; "
        "the model's output must have one row of class scores per label."
      )
    logits = logits.reshape(*labels.shape, logits.shape[-1])
  if "mask" in batch:
    # Padded positions may hold any id (e.g. -1); keep them in range so no NaN reaches the gradient.
    labels = jnp.where(batch["mask"] > 0, labels, 0)
  return logits.astype(jnp.float32), labels


def _masked(losses: jax.Array, batch: dict) -> jax.Array:
  """Zero at padded positions, so the caller's weighted mean ignores them even if it forgets the mask."""
  if "mask" not in batch:
    return losses
  return jnp.where(batch["mask"] > 0, losses, 0.0)


def cross_entropy(logits_BxC: jax.Array, batch: dict) -> jax.Array:
  """Softmax cross-entropy against integer `batch["label"]`; [B]."""
  logits_BxC, labels_B = _logits_and_labels(logits_BxC, batch, "label")
  return _masked(optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B), batch)


def mse(logits_BxC: jax.Array, batch: dict) -> jax.Array:
  """Mean over classes of (softmax(logits) - one_hot(label))**2, as Keras defines MSE for classifiers; [B]."""
  logits_BxC, labels_B = _logits_and_labels(logits_BxC, batch, "label")
  probs_BxC = jax.nn.softmax(logits_BxC, axis=-1)
  one_hot_BxC = jax.nn.one_hot(labels_B, logits_BxC.shape[-1], dtype=jnp.float32)
  return _masked(jnp.mean(optax.squared_error(probs_BxC, one_hot_BxC), axis=-1), batch)


def label_smoothing(smoothing: float) -> LossFn:
  """Cross-entropy against one-hot labels smoothed by `smoothing` (optax.smooth_labels)."""

  def loss_fn(logits_BxC: jax.Array, batch: dict) -> jax.Array:
    logits_BxC, labels_B = _logits_and_labels(logits_BxC, batch, "label")
    one_hot_BxC = jax.nn.one_hot(labels_B, logits_BxC.shape[-1], dtype=jnp.float32)
    targets_BxC = optax.smooth_labels(one_hot_BxC, smoothing)
    return _masked(optax.softmax_cross_entropy(logits_BxC, targets_BxC), batch)

  return loss_fn


def next_token(logits_BxLxV: jax.Array, batch: dict) -> jax.Array:
  """Per-token cross-entropy against integer `batch["targets"]`; [B, L] (logits may also be [B*L, V])."""
  logits_BxLxV, targets_BxL = _logits_and_labels(logits_BxLxV, batch, "targets")
  return _masked(optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL), batch)


# Name -> builder from the `loss` config section to a loss function; the names are choices.LOSSES, checked
# (with the task each fits) before jax starts.
LOSSES: dict[str, Callable[[ml_collections.ConfigDict], LossFn]] = {
  "cross_entropy": lambda config: cross_entropy,
  "mse": lambda config: mse,
  "label_smoothing": lambda config: label_smoothing(float(config.label_smoothing)),
  "next_token": lambda config: next_token,
}


def get_loss(loss_config: ml_collections.ConfigDict) -> LossFn:
  """The loss function named by `loss_config.name`."""
  return config_lib.lookup(LOSSES, "loss.name", loss_config.name)(loss_config)
