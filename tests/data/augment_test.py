"""Tests for jaxcollab/data/augment.py: vectorised batch augmentation, random by stream position."""

import numpy as np
import pytest

from jaxcollab.data import augment


def _images(n, size=8, channels=1):
  return np.random.default_rng(0).random((n, size, size, channels), dtype=np.float32)


def test_uniforms_depend_on_position_not_on_grouping():
  positions = np.arange(1000, 1100)
  whole = augment.uniforms(7, positions, 4)
  parts = np.concatenate([augment.uniforms(7, positions[i : i + 7], 4) for i in range(0, 100, 7)])
  np.testing.assert_array_equal(whole, parts)
  assert not np.array_equal(whole, augment.uniforms(8, positions, 4))


def test_uniforms_look_uniform_and_independent():
  u = augment.uniforms(0, np.arange(20_000), 4)
  assert 0.0 <= u.min() and u.max() < 1.0
  np.testing.assert_allclose(u.mean(axis=0), 0.5, atol=0.01)
  np.testing.assert_allclose(u.var(axis=0), 1 / 12, atol=0.003)
  # Neighbouring positions and draws are uncorrelated.
  corr = np.corrcoef(np.concatenate([u[:-1], u[1:]], axis=1).T)
  assert np.abs(corr - np.eye(8)).max() < 0.03


@pytest.mark.parametrize("shape", [(8, 1), (28, 1), (32, 3)])
def test_row_depends_only_on_its_image_seed_and_position(shape):
  images = _images(12, *shape)
  positions = np.arange(500, 512)
  whole = augment.augment_batch(images, 3, positions)
  reordered = augment.augment_batch(images[::-1], 3, positions[::-1])[::-1]
  single = np.concatenate([augment.augment_batch(images[i : i + 1], 3, positions[i : i + 1]) for i in range(12)])
  np.testing.assert_array_equal(whole, reordered)
  np.testing.assert_array_equal(whole, single)
  assert whole.shape == images.shape and whole.dtype == np.float32
  assert 0.0 <= whole.min() and whole.max() <= 1.0
  # Every image moves, and another seed moves it differently.
  assert (np.abs(whole - images).reshape(12, -1).max(axis=1) > 1e-3).all()
  assert not np.array_equal(whole, augment.augment_batch(images, 4, positions))


def test_bilinear_at_integer_offsets_is_a_zero_filled_shift():
  images = _images(2)
  gy, gx = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
  shifted = augment._bilinear(images, np.stack([gy + 1, gy]), np.stack([gx, gx - 2]))  # pylint: disable=protected-access
  np.testing.assert_array_equal(shifted[0, :7], images[0, 1:])
  assert not shifted[0, 7].any()
  np.testing.assert_array_equal(shifted[1, :, 2:], images[1, :, :6])
  assert not shifted[1, :, :2].any()


def test_flip_mirrors_about_half_the_images_only_when_configured():
  images = _images(200)
  positions = np.arange(200)
  unflipped = augment.augment_batch(images, 0, positions, flip=False)
  flipped = augment.augment_batch(images, 0, positions, flip=True)
  mirrored = np.array([np.array_equal(f, u[:, ::-1]) for f, u in zip(flipped, unflipped)])
  same = np.array([np.array_equal(f, u) for f, u in zip(flipped, unflipped)])
  # The same draws precede the coin, so each image is the flip=False image or its exact mirror.
  assert (mirrored | same).all()
  assert 70 <= mirrored.sum() <= 130
