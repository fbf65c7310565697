"""Image augmentation for training batches: random translation, small rotation, optional flip.

Each call draws from the `np.random.Generator` that grain's `random_map` seeds from the
pipeline seed and the element's position, so a resumed iterator augments identically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

MAX_ROTATION_DEGREES = 10.0


def translate(image: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Zero-pads by `max_shift` pixels on each side and crops a random window of the original size."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
  return padded[dy:dy + h, dx:dx + w]


def rotate(image: np.ndarray, rng: np.random.Generator, max_degrees: float = MAX_ROTATION_DEGREES) -> np.ndarray:
  """Rotates about the centre by a uniform angle in [-max_degrees, max_degrees], zero fill."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top  # Only augmented runs pay the import.

  angle = rng.uniform(-max_degrees, max_degrees)
  # order=1 (bilinear) interpolates convexly, so values stay inside the input's range.
  return ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="constant", cval=0.0)


@dataclasses.dataclass(frozen=True)
class Augment:
  """grain random_map transform over {"image": float32 [H,W,C] in [0,1], ...} examples."""

  flip: bool = False

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = example["image"]
    # 1/8 of the side: 1 px for 8x8 digits, 3 for 28x28, 4 for 32x32 (the classic CIFAR crop).
    image = translate(image, rng, max(1, image.shape[0] // 8))
    image = rotate(image, rng)
    # Digits and MNIST are not mirror-symmetric classes, so flipping is opt-in (dataset.flip).
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return {**example, "image": np.ascontiguousarray(image)}
