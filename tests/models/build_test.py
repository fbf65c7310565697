"""Properties every registered model must have: shapes, jit, training, logical names, dtypes."""

import collections
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcollab import config as config_lib
from jaxcollab import models
from jaxcollab.models import gpt_config

Info = collections.namedtuple("Info", "name kind image_shape num_classes vocab_size seq_len")
IMAGES = Info("toy", "image", (8, 8, 3), 5, None, None)
TEXT = Info("toy", "text", None, None, 256, 16)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "hidden", "conv_in", "conv_out", "classes", "norm", None}

# Small enough for a 2-core CPU; each still exercises every layer type of its model.
CASES = {
  "mlp": dict(hidden=32),
  "cnn": dict(features=(8, 16), dense=32),
  "resnet": dict(depth=18, width=8),
  "gpt": dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, context=16),
}


def make(name: str, **overrides) -> tuple[nn.Module, jax.Array, jax.Array]:
  """The model, a fixed input batch and its labels."""
  config = config_lib.defaults()
  config.model.name = name
  for k, v in {**CASES[name], **overrides}.items():
    config.model[k] = v
  info = TEXT if name == "gpt" else IMAGES
  model = models.build(config, info)
  k1, k2 = jax.random.split(jax.random.key(42))
  if name == "gpt":
    x = jax.random.randint(k1, (4, TEXT.seq_len), 0, TEXT.vocab_size, jnp.int32)
    return model, x, jnp.roll(x, -1, axis=1)
  x = jax.random.normal(k1, (8, *IMAGES.image_shape), jnp.float32)
  return model, x, jax.random.randint(k2, (8,), 0, IMAGES.num_classes)


def init(model: nn.Module, x: jax.Array):
  # One jitted init compiles once (eager init compiles every op separately), and an "rbg" key compiles
  # ~4x faster than threefry on this CPU for a ResNet's many small draws; the initializers are the same.
  key = jax.random.key(0, impl="rbg")
  return nn.unbox(jax.jit(lambda x: model.init({"params": key}, x, train=False))(x))


@functools.cache
def setup(name: str):
  """make(name) plus its initial variables, shared by the tests of this file."""
  model, x, labels = make(name)
  return model, x, labels, init(model, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape_dtype_and_finite(name):
  model, x, labels, variables = setup(name)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  expected = (*x.shape, TEXT.vocab_size) if name == "gpt" else (x.shape[0], IMAGES.num_classes)
  assert logits.shape == expected
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_matches_eager(name):
  model, x, _, variables = setup(name)
  eager = model.apply(variables, x, train=False)
  jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adam_steps_lower_loss_on_fixed_batch(name):
  model, x, labels, variables = setup(name)
  tx = optax.adam(3e-3)

  def loss_fn(params, batch_stats):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    out = model.apply(variables, x, train=True, mutable=["batch_stats"] if batch_stats else False)
    logits, new_stats = (out[0], out[1]["batch_stats"]) if batch_stats else (out, batch_stats)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_stats

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  opt_state = tx.init(params)
  losses = []
  for _ in range(6):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_param_has_one_logical_name_per_axis(name):
  model, x, _ = make(name)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))["params"]
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda l: isinstance(l, jax.sharding.PartitionSpec))
  assert len(leaves) == len(spec_leaves) > 0
  for (path, leaf), spec in zip(leaves, spec_leaves):
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{jax.tree_util.keystr(path)} has no logical names"
    assert len(spec) == leaf.value.ndim, (jax.tree_util.keystr(path), spec)
    assert set(spec) <= LOGICAL_NAMES, (jax.tree_util.keystr(path), spec)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_computes_in_bf16_with_float32_params_and_logits(name):
  model32, x, _, variables = setup(name)
  model16, _, _ = make(name, dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits16 = jax.jit(lambda v: model16.apply(v, x, train=False))(variables)
  logits32 = jax.jit(lambda v: model32.apply(v, x, train=False))(variables)
  assert logits16.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits16)).all()
  # Close to float32 (same params), yet not identical: the computation really ran in bf16.
  np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.1, rtol=0.1)
  assert not np.array_equal(np.asarray(logits16), np.asarray(logits32))


def test_registry_and_build_errors():
  assert set(models.MODELS) == {"mlp", "cnn", "resnet", "gpt"}
  config = config_lib.defaults()
  config.model.name = "transformer"
  with pytest.raises(ValueError, match="Unknown model.name 'transformer'"):
    models.build(config, IMAGES)


def test_gpt_dims_named_size_overrides_fields():
  model = gpt_config.config_fields()
  assert gpt_config.dims(model) == dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, context=256)
  model.size = "gpt2-124m"
  assert gpt_config.dims(model) == dict(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, context=1024)
  model.size = "gpt3"
  with pytest.raises(ValueError, match="Unknown model.size 'gpt3'"):
    gpt_config.dims(model)


# ResNet uses the same conv and classifier names as the CNN; its sharded compile costs ~10 s here.
@pytest.mark.parametrize("name", ["cnn", "gpt", "mlp"])
def test_sharded_over_data_fsdp_tensor_matches_unsharded(name):
  from jaxcollab import sharding  # pylint: disable=g-import-not-at-top

  model, x, _, variables = setup(name)
  config = config_lib.defaults()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh, rules = sharding.make_mesh(config.mesh), sharding.parse_rules(config.mesh.rules)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  sharded = jax.device_put(variables, shardings)
  used = {axis for a in jax.tree.leaves(sharded["params"]) for axis in a.sharding.spec}
  assert {"fsdp", "tensor"} <= used, used
  x_sharded = jax.device_put(x, sharding.batch_sharding(mesh))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_allclose(apply(sharded, x_sharded), apply(variables, x), rtol=1e-5, atol=1e-5)


def test_a_cudnn_run_reads_back_on_a_cpu():
  config = config_lib.load_experiment("gpt_pydocs", "smoke")
  config.model.attention = "cudnn"
  info = types.SimpleNamespace(vocab_size=256, seq_len=32)
  with pytest.raises(ValueError, match="model.attention=cudnn is impossible here"):
    models.build(config, info)  # Training with it on a CPU is refused ...
  readable = models.portable(config)  # ... but reading a saved run made with it works anywhere.
  assert readable.model.attention == "auto" and config.model.attention == "cudnn"
  assert models.build(readable, info).config.attention == "xla"  # What auto resolves to on a CPU.
