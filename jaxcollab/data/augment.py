"""Image augmentation of whole training batches: random translation, small rotation, optional flip.

Split in two so that the pixels are moved inside the jitted train step, not on the host:
  `draws` (host, numpy): each example's translation, angle and mirror sign, a counter-based hash of
      the pipeline seed and the example's position in the epoch-shuffled stream. An example is
      therefore augmented the same way however the stream is cut into batches or processes, and
      a resumed iterator augments identically. The pipeline ships them as batch["augment"].
  `apply` (jax): one bilinear resampling per image with those draws; the train step calls
      `apply_to_batch` first. On the CPU this is ~40 us of fused XLA per cnn_digits batch against
      ~300 us of numpy on the host, where it competed with the step for the cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_ROTATION_DEGREES = 10.0
# Draws per example: dy, dx, angle, flip coin.
_DRAWS = 4
KEY = "augment"  # The batch key of the draws: float32 [B, 4] = (dy, dx, angle in radians, mirror +-1).


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 whose outputs look independent for nearby inputs."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniforms(seed: int, positions: np.ndarray, draws: int) -> np.ndarray:
  """float64 [N, draws] in [0, 1): a function of (seed, position, draw) only."""
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design.
    key = _mix(np.uint64(seed % 2**64) + np.uint64(0x9E3779B97F4A7C15))
    counters = positions.astype(np.uint64)[:, None] * np.uint64(draws) + np.arange(draws, dtype=np.uint64)
    bits = _mix(counters ^ key)
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draws(seed: int, positions_B: np.ndarray, image_size: int, flip: bool = False) -> np.ndarray:
  """float32 [B, 4]: each example's (dy, dx, angle, mirror), a function of (seed, position) only.

  Shifts are whole pixels up to 1/8 of the side, the angle is within +-10 degrees, and the mirror
  sign is -1 for about half the examples when `flip`, else 1.
  """
  u_BxR = uniforms(seed, positions_B, _DRAWS)
  # 1/8 of the side: 1 px for 8x8 digits, 3 for 28x28, 4 for 32x32 (the classic CIFAR crop).
  shift = max(1, image_size // 8)
  dy_B = np.floor(u_BxR[:, 0] * (2 * shift + 1)) - shift
  dx_B = np.floor(u_BxR[:, 1] * (2 * shift + 1)) - shift
  angle_B = np.deg2rad((2 * u_BxR[:, 2] - 1) * MAX_ROTATION_DEGREES)
  # Digits and MNIST are not mirror-symmetric classes, so flipping is opt-in (dataset.flip).
  mirror_B = np.where(flip & (u_BxR[:, 3] < 0.5), -1.0, 1.0)
  return np.stack([dy_B, dx_B, angle_B, mirror_B], axis=1).astype(np.float32)


def _bilinear(images_BxHxWxC: jax.Array, y_BxHxW: jax.Array, x_BxHxW: jax.Array) -> jax.Array:
  """Samples each image at fractional (y, x); points outside the image read 0 (zero fill)."""
  B, H, W, C = images_BxHxWxC.shape
  y0, x0 = jnp.floor(y_BxHxW), jnp.floor(x_BxHxW)
  wy, wx = (y_BxHxW - y0)[..., None], (x_BxHxW - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  # One flat index per pixel: XLA makes a single gather of it.
  pixels_NxC = images_BxHxWxC.reshape(B * H * W, C)
  first_Bx1x1 = (jnp.arange(B, dtype=jnp.int32) * (H * W))[:, None, None]
  out = jnp.zeros(images_BxHxWxC.shape, images_BxHxWxC.dtype)
  for dy, dx, w in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
    yy, xx = y0 + dy, x0 + dx
    inside = ((yy >= 0) & (yy < H) & (xx >= 0) & (xx < W))[..., None]
    out += w * inside * pixels_NxC[first_Bx1x1 + jnp.clip(yy, 0, H - 1) * W + jnp.clip(xx, 0, W - 1)]
  return out


def apply(images_BxHxWxC: jax.Array, draws_Bx4: jax.Array) -> jax.Array:
  """Translates, rotates and mirrors each image by its draws: one bilinear resampling, zero fill, [0, 1].

  Row i depends only on image i and draws i. The translation, rotation and mirror compose into one
  affine map of the output grid, so each image is resampled once.
  """
  _, H, W, _ = images_BxHxWxC.shape
  dy, dx, angle, mirror = (draws_Bx4[:, i, None, None] for i in range(_DRAWS))
  cy, cx = (H - 1) / 2, (W - 1) / 2
  gy, gx = jnp.meshgrid(jnp.arange(H) - cy, jnp.arange(W) - cx, indexing="ij")
  gy, gx = gy[None], gx[None]
  # Output pixel p reads the source at R(angle) M (p - centre) + centre - shift; mirroring the
  # output grid about its centre mirrors the augmented image exactly.
  gx_BxHxW = mirror * gx
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_y = cos * gy - sin * gx_BxHxW + cy - dy
  src_x = sin * gy + cos * gx_BxHxW + cx - dx
  out = _bilinear(images_BxHxWxC, src_y, src_x)
  # Bilinear weights are convex, so values stay in the input's range up to rounding; clip that.
  return jnp.clip(out, 0.0, 1.0)


def apply_to_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch with its "image" augmented by its draws, when it carries them; unchanged otherwise."""
  if KEY not in batch:
    return batch
  rest = {k: v for k, v in batch.items() if k != KEY}
  return {**rest, "image": apply(batch["image"], batch[KEY])}


def augment_batch(images_BxHxWxC: np.ndarray, seed: int, positions_B: np.ndarray, flip: bool = False) -> np.ndarray:
  """`apply` with the draws of (seed, positions), on host arrays: what the train step sees."""
  d_Bx4 = draws(seed, positions_B, images_BxHxWxC.shape[1], flip)
  return np.asarray(jax.jit(apply)(images_BxHxWxC, d_Bx4))
