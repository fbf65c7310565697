"""ResNet: torchvision parameter counts, strides and BatchNorm running statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab.models import resnet as resnet_lib


def abstract(config: resnet_lib.ResNetConfig, image_shape: tuple[int, int, int]):
  model = resnet_lib.ResNet(config)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return model, jax.eval_shape(lambda: nn.unbox(model.init({"params": jax.random.key(0)}, x, train=False)))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "depth, stem, classes, image_shape, expected",
  [
    (18, "cifar", 10, (32, 32, 3), 11_173_962),  # torchvision resnet18 with a 3x3 stem, no max-pool.
    (18, "imagenet", 1000, (224, 224, 3), 11_689_512),  # torchvision resnet18.
    (34, "imagenet", 1000, (224, 224, 3), 21_797_672),  # torchvision resnet34.
    (50, "imagenet", 1000, (224, 224, 3), 25_557_032),  # torchvision resnet50.
  ],
)
def test_parameter_count_matches_torchvision(depth, stem, classes, image_shape, expected):
  _, variables = abstract(resnet_lib.ResNetConfig(classes, depth=depth, stem=stem), image_shape)
  assert count(variables["params"]) == expected


def test_stem_and_stages_downsample_like_torchvision():
  # ImageNet stem: 224 -> 112 (conv/2) -> 56 (pool/2); stages 2-4 halve to 7; ResNet-50 ends with 2048 channels.
  _, variables = abstract(resnet_lib.ResNetConfig(1000, depth=50, stem="imagenet"), (224, 224, 3))
  assert variables["params"]["head"]["kernel"].shape == (2048, 1000)
  config = resnet_lib.ResNetConfig(10, depth=18, width=8, stem="imagenet")
  model, variables = abstract(config, (224, 224, 3))
  features = jax.eval_shape(
    lambda v: model.apply(
      v, jnp.zeros((1, 224, 224, 3)), train=False, capture_intermediates=True, mutable=["intermediates"]
    )[1],
    variables,
  )["intermediates"]
  assert features["stage1_block1"]["__call__"][0].shape == (1, 56, 56, 8)
  assert features["stage4_block2"]["__call__"][0].shape == (1, 7, 7, 64)


def random_variables(config: resnet_lib.ResNetConfig, image_shape):
  """Parameters drawn on the host: these tests need distinct values, not the init's (slow to compile)."""
  model, shapes = abstract(config, image_shape)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes["params"])
  stats = {"mean": jnp.zeros, "var": jnp.ones}
  batch_stats = jax.tree_util.tree_map_with_path(lambda p, s: stats[p[-1].key](s.shape, s.dtype), shapes["batch_stats"])
  return model, {"params": params, "batch_stats": batch_stats}


def test_batch_stats_update_in_training_and_are_used_in_evaluation():
  config = resnet_lib.ResNetConfig(5, depth=18, width=4)
  model, variables = random_variables(config, (8, 8, 3))
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3)) * 2 + 1  # Not already zero-mean, unit-variance.

  @jax.jit
  def train(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  evaluate = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  logits, updates = train(variables, x)
  new = {**variables, "batch_stats": updates["batch_stats"]}
  mean0, mean1 = variables["batch_stats"]["stem_bn"]["mean"], new["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(mean0, mean1)
  # momentum 0.9: the running mean moves a tenth of the way from 0 to the batch mean of the stem conv.
  stem = jax.lax.conv_general_dilated(
    x, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(mean1, 0.1 * jnp.mean(stem, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Evaluation normalises with the running statistics, so it changes when they do...
  assert not np.allclose(evaluate(variables, x), evaluate(new, x))
  # ...and treats each example alone, unlike training, which uses the batch's statistics.
  np.testing.assert_allclose(evaluate(new, x)[:3], evaluate(new, x[:3]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(train(new, x)[0][:3], train(new, x[:3])[0])


def test_unknown_depth_and_stem_are_clear_errors():
  with pytest.raises(ValueError, match="depth 20"):
    abstract(resnet_lib.ResNetConfig(10, depth=20), (8, 8, 3))
  with pytest.raises(ValueError, match="stem 'vit'"):
    abstract(resnet_lib.ResNetConfig(10, stem="vit"), (8, 8, 3))
