"""CNN: exact sizes for the default conv stack and that each stage halves the image."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab.models import cnn as cnn_lib


def shapes(config: cnn_lib.CNNConfig, image_shape):
  model = cnn_lib.CNN(config)
  x = jnp.zeros((1, *image_shape))
  return jax.eval_shape(lambda: nn.unbox(model.init({"params": jax.random.key(0)}, x, train=False)))["params"]


def conv(c_in: int, c_out: int) -> int:
  return 3 * 3 * c_in * c_out + c_out


@pytest.mark.parametrize(
  "image_shape, expected",
  [
    # digits 8x8 -> two pools -> 2x2x64 = 256 features into Dense(256).
    ((8, 8, 1), conv(1, 32) + conv(32, 64) + 256 * 256 + 256 + 256 * 10 + 10),  # 87,178
    # mnist 28x28 -> 7x7x64 = 3136 features.
    ((28, 28, 1), conv(1, 32) + conv(32, 64) + 3136 * 256 + 256 + 256 * 10 + 10),
  ],
)
def test_default_parameter_count(image_shape, expected):
  params = shapes(cnn_lib.CNNConfig(10), image_shape)
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params)) == expected


def test_digits_default_count_is_87178():
  params = shapes(cnn_lib.CNNConfig(10), (8, 8, 1))
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params)) == 87_178


def test_each_feature_entry_adds_a_conv_and_a_pool():
  params = shapes(cnn_lib.CNNConfig(10, features=(4, 8, 16)), (16, 16, 3))
  assert [params[f"conv_{i}"]["kernel"].shape for i in range(3)] == [(3, 3, 3, 4), (3, 3, 4, 8), (3, 3, 8, 16)]
  assert params["dense"]["kernel"].shape == (2 * 2 * 16, 256)  # 16 -> 8 -> 4 -> 2
