"""Tests for jaxcollab/data/augment.py: draws by stream position on the host, one jitted resampling per batch."""

import jax
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


@pytest.mark.parametrize("size, shift", [(8, 1), (28, 3), (32, 4)])
def test_draws_are_whole_pixel_shifts_small_angles_and_a_mirror_only_with_flip(size, shift):
  positions = np.arange(4000)
  d = augment.draws(1, positions, size)
  assert d.shape == (4000, 4) and d.dtype == np.float32
  dy, dx, angle, mirror = d.T
  for offsets in (dy, dx):  # Every whole shift in [-shift, shift], none outside.
    assert set(offsets.tolist()) == set(range(-shift, shift + 1))
  assert np.abs(angle).max() <= np.deg2rad(augment.MAX_ROTATION_DEGREES) and np.abs(angle).max() > 0.9 * np.deg2rad(10)
  assert (mirror == 1).all()
  flipped = augment.draws(1, positions, size, flip=True)
  np.testing.assert_array_equal(flipped[:, :3], d[:, :3])  # The coin comes last: the rest is unchanged.
  assert set(flipped[:, 3].tolist()) == {-1.0, 1.0} and 1800 < (flipped[:, 3] < 0).sum() < 2200
  np.testing.assert_array_equal(augment.draws(1, positions[::-1], size), d[::-1])


def test_zero_draws_leave_images_unchanged():
  images = _images(3)
  identity = np.tile(np.array([[0, 0, 0, 1]], np.float32), (3, 1))
  np.testing.assert_allclose(np.asarray(jax.jit(augment.apply)(images, identity)), images, atol=1e-6)


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
