"""Tests for jaxcollab/losses.py: each loss against a hand-written formula, shapes and masking."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcollab import config as config_lib
from jaxcollab import losses
from jaxcollab.errors import UserError

B, C, L, V = 6, 5, 7, 11


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture(name="data")
def _data():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, C)).astype(np.float32) * 3
  labels = rng.integers(0, C, size=(B,)).astype(np.int32)
  return logits, labels


def test_cross_entropy_is_minus_log_softmax(data):
  logits, labels = data
  got = losses.cross_entropy(jnp.asarray(logits), {"label": jnp.asarray(labels)})
  want = -_log_softmax(logits)[np.arange(B), labels]
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mse_is_keras_mean_squared_error_on_probabilities(data):
  logits, labels = data
  got = losses.mse(jnp.asarray(logits), {"label": jnp.asarray(labels)})
  probs = np.exp(_log_softmax(logits))
  want = np.mean((probs - np.eye(C)[labels]) ** 2, axis=-1)  # keras.losses.MeanSquaredError, per example.
  assert got.shape == (B,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_label_smoothing_zero_is_cross_entropy(data):
  logits, labels = data
  batch = {"label": jnp.asarray(labels)}
  np.testing.assert_allclose(
    losses.label_smoothing(0.0)(jnp.asarray(logits), batch), losses.cross_entropy(jnp.asarray(logits), batch), rtol=1e-6
  )


def test_label_smoothing_matches_smoothed_targets(data):
  logits, labels = data
  alpha = 0.2
  got = losses.label_smoothing(alpha)(jnp.asarray(logits), {"label": jnp.asarray(labels)})
  targets = np.eye(C)[labels] * (1 - alpha) + alpha / C  # optax.smooth_labels' definition.
  want = -(targets * _log_softmax(logits)).sum(axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  ce = losses.cross_entropy(jnp.asarray(logits), {"label": jnp.asarray(labels)})
  assert np.all(np.abs(np.asarray(got) - np.asarray(ce)) > 1e-3)


def test_next_token_accepts_3d_and_flat_logits():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(B, L, V)).astype(np.float32)
  targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
  batch = {"targets": jnp.asarray(targets), "mask": jnp.ones((B, L), jnp.float32)}
  got_3d = losses.next_token(jnp.asarray(logits), batch)
  got_2d = losses.next_token(jnp.asarray(logits.reshape(B * L, V)), batch)
  want = -np.take_along_axis(_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  assert got_3d.shape == got_2d.shape == (B, L)
  np.testing.assert_allclose(got_3d, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_3d, got_2d)


def test_bfloat16_logits_give_float32_losses(data):
  logits, labels = data
  got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), {"label": jnp.asarray(labels)})
  assert got.dtype == jnp.float32


def test_mismatched_logits_raise():
  with pytest.raises(ValueError, match="one row of class scores per label"):
    losses.next_token(jnp.zeros((B * L + 1, V)), {"targets": jnp.zeros((B, L), jnp.int32)})


@pytest.mark.parametrize("name", ["cross_entropy", "mse", "label_smoothing", "next_token"])
def test_masked_positions_are_zero_and_never_nan(name):
  c = config_lib.defaults().loss
  c.name = name
  loss_fn = losses.get_loss(c)
  rng = np.random.default_rng(2)
  if name == "next_token":
    logits = jnp.asarray(rng.normal(size=(B, L, V)), jnp.float32)
    mask = np.ones((B, L), np.float32)
    mask[:, -3:] = 0
    labels = rng.integers(0, V, size=(B, L)).astype(np.int32)
    key = "targets"
  else:
    logits = jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
    mask = np.ones((B,), np.float32)
    mask[-2:] = 0
    labels = rng.integers(0, C, size=(B,)).astype(np.int32)
    key = "label"
  labels = np.where(mask > 0, labels, -1)  # Padding ids out of range, as a packed LM batch has.
  batch = {key: jnp.asarray(labels), "mask": jnp.asarray(mask)}

  def mean_loss(x):
    per_example = loss_fn(x, batch)
    return jnp.sum(per_example * batch["mask"]) / jnp.sum(batch["mask"])

  per_example = loss_fn(logits, batch)
  grads = jax.grad(mean_loss)(logits)
  assert per_example.shape == mask.shape
  np.testing.assert_array_equal(np.asarray(per_example)[mask == 0], 0.0)
  assert np.all(np.asarray(per_example)[mask > 0] > 0)
  assert np.all(np.isfinite(per_example)) and np.all(np.isfinite(grads))
  np.testing.assert_array_equal(np.asarray(grads)[mask == 0], 0.0)


def test_get_loss_by_name():
  c = config_lib.defaults().loss
  c.name, c.label_smoothing = "label_smoothing", 0.3
  logits, labels = jnp.asarray([[2.0, 0.0, -1.0]]), jnp.asarray([0])
  want = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.3))
  np.testing.assert_allclose(losses.get_loss(c)(logits, {"label": labels}), want, rtol=1e-6)
  for name in ("cross_entropy", "mse", "next_token"):
    c.name = name
    assert losses.get_loss(c) is getattr(losses, name)


def test_get_loss_unknown_name_raises_user_error():
  c = config_lib.defaults().loss
  c.name = "hinge"
  with pytest.raises(UserError, match="Unknown loss.name 'hinge'.*cross_entropy"):
    losses.get_loss(c)
