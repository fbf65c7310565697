"""Meshes, rules and sharded training on 8 simulated CPU devices (tests/conftest.py).

The central property: for the gpt and cnn smoke configs, training on data=8, fsdp=8 and
data=2 x fsdp=2 x tensor=2 gives the 1-device losses, from bit-identical initial parameters
born sharded, while parameters and optimizer moments really live split the way the rules say.
"""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxcollab import config as config_lib
from jaxcollab import jaxprs, sharding, train
from jaxcollab import run as run_lib
from jaxcollab.errors import UserError

STEPS = 3
MODELS = {"gpt": "gpt_pydocs", "cnn": "cnn_digits"}  # Smoke batches: 8 and 32, both divisible by 8.
MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


def smoke(name: str, *overrides: str) -> config_lib.ConfigDict:
  return config_lib.apply_overrides(config_lib.load_experiment(name, "smoke"), list(overrides))


def mesh_config(data: int, fsdp: int, tensor: int) -> config_lib.ConfigDict:
  c = config_lib.defaults().mesh
  c.data, c.fsdp, c.tensor = data, fsdp, tensor
  return c


class CompileCounter:
  """Counts XLA compilations while active (jax reports each backend compile as a monitoring event)."""

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def test_compile_counter_sees_a_compilation():
  with CompileCounter() as counter:
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
  assert counter.count >= 1


# --- Meshes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "sizes, expected",
  [
    ((-1, 1, 1), (8, 1, 1)),
    ((1, -1, 1), (1, 8, 1)),
    ((2, 2, -1), (2, 2, 2)),
    ((-1, 2, 2), (2, 2, 2)),
    ((1, 4, 2), (1, 4, 2)),
  ],
)
def test_mesh_fills_minus_one_and_uses_every_device(sizes, expected):
  mesh = sharding.make_mesh(mesh_config(*sizes))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == expected
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_on_chosen_devices():
  mesh = sharding.make_mesh(mesh_config(-1, 1, 2), jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert {d.id for d in mesh.devices.flat} == {0, 1, 2, 3}


@pytest.mark.parametrize(
  "sizes, message",
  [
    ((3, 1, 1), r"mesh.data\*mesh.fsdp\*mesh.tensor = 3 but there are 8 devices"),
    ((4, 4, 1), r"= 16 but there are 8 devices"),
    ((-1, -1, 1), "Only one of mesh.data/fsdp/tensor may be -1, got -1 for data, fsdp"),
    ((3, -1, 1), "multiply to 3, which does not divide the 8 devices"),
    ((0, 8, 1), "mesh.data must be a positive size or -1"),
    ((1, 1, -2), "mesh.tensor must be a positive size or -1"),
  ],
)
def test_impossible_mesh_is_one_sentence(sizes, message):
  with pytest.raises(UserError, match=message) as e:
    sharding.make_mesh(mesh_config(*sizes))
  assert "\n" not in str(e.value)


def test_rules_parse_and_reject_unknown_axes():
  rules = dict(sharding.parse_rules(config_lib.defaults().mesh.rules))
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp" and rules["heads"] == "tensor"
  assert rules["kv"] is None and rules["norm"] is None
  with pytest.raises(UserError, match="unknown mesh axis 'model'"):
    sharding.parse_rules([("mlp", "model")])
  with pytest.raises(UserError, match="must be a pair"):
    sharding.parse_rules([("mlp",)])


def test_one_process_holds_every_batch_row():
  assert sharding.process_rows(sharding.make_mesh(mesh_config(2, 2, 2)), 16) == (0, 16)


def test_process_shards_concatenate_to_the_one_process_batch():
  # make_array_from_process_local_data puts process p's rows at block p of the global batch.
  dataset = run_lib.build(smoke("gpt_pydocs")).dataset
  one = dataset.train_iterator(batch_size=8, seed=0)
  two = [dataset.train_iterator(batch_size=4, seed=0, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    batch, parts = next(one), [next(it) for it in two]
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([parts[0][key], parts[1][key]]))


# --- Impossible layouts fail in run_lib.build, before anything compiles ---------------------------


@pytest.mark.parametrize(
  "name, overrides, message",
  [
    ("gpt_pydocs", ["mesh.data=3"], r"mesh.data\*mesh.fsdp\*mesh.tensor = 3 but there are 8 devices"),
    ("gpt_pydocs", ["mesh.data=-1", "mesh.tensor=-1"], "Only one of mesh.data/fsdp/tensor may be -1"),
    (
      "gpt_pydocs",
      ["mesh.data=8", "train.batch_size=12"],
      r"train.batch_size=12 is not divisible by mesh data\*fsdp=8",
    ),
    (
      "gpt_pydocs",
      ["mesh.data=2", "mesh.fsdp=4", "train.batch_size=8", "train.eval_batch_size=20"],
      r"train.eval_batch_size=20 is not divisible by mesh data\*fsdp=8",
    ),
    (
      "gpt_pydocs",
      ["mesh.data=2", "mesh.tensor=4"],  # smoke: 2 heads
      r"'heads' axis \(model.num_heads\), which mesh.tensor=4 cannot split evenly",
    ),
    (
      "gpt_pydocs",
      ["mesh.data=1", "mesh.tensor=8", "model.num_heads=8", "model.mlp_dim=100"],
      r"size 100 on its 'mlp' axis \(model.mlp_dim\), which mesh.tensor=8",
    ),
    (
      "gpt_pydocs",
      ["mesh.data=1", "mesh.fsdp=8", "model.embed_dim=36", "model.num_heads=2"],
      r"size 36 on its 'embed' axis \(model.embed_dim\), which mesh.fsdp=8",
    ),
    (
      "cnn_digits",
      ["mesh.data=1", "mesh.fsdp=8", "model.features=(30, 64)"],
      r"Parameter conv_0/bias has size 30 on its 'conv_out' axis \(model.features\), which mesh.fsdp=8",
    ),
    (
      "mlp_digits",
      ["mesh.data=1", "mesh.tensor=8", "model.hidden=100"],
      r"size 100 on its 'hidden' axis \(model.hidden\), which mesh.tensor=8",
    ),
  ],
)
def test_impossible_layout_is_a_user_error_before_compiling(name, overrides, message):
  config = smoke(name, *overrides)
  with CompileCounter() as counter, pytest.raises(UserError, match=message) as e:
    run_lib.build(config)
  assert counter.count == 0
  assert "\n" not in str(e.value)


def test_an_axis_mapped_to_nothing_needs_no_divisibility():
  # 30 conv channels cannot split 8 ways; replicating conv_out makes the same mesh valid.
  rules = tuple((k, "" if k == "conv_out" else v) for k, v in config_lib.defaults().mesh.rules)
  config = smoke("cnn_digits", "mesh.data=1", "mesh.fsdp=8", "model.features=(30, 64)")
  config.mesh.rules = rules
  with CompileCounter() as counter:
    run = run_lib.build(config)
  assert counter.count == 0
  assert run.shardings.params["conv_0"]["kernel"].spec == P(None, None, None, None)


# --- The same training on every mesh -------------------------------------------------------------


def train_steps(name: str, mesh: tuple[int, int, int]):
  """Initial parameters (host copies), per-step losses, and the final state and run."""
  data, fsdp, tensor = mesh
  config = smoke(name, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
  run = run_lib.build(config, jax.devices()[: math.prod(mesh)])
  state = run.init_state()
  initial = jax.device_get(state.params)
  step = train.jit_train_step(run)
  batches = run.dataset.train_iterator(batch_size=config.train.batch_size, seed=config.seed)
  batch_sharding = sharding.batch_sharding(run.mesh)
  metrics = []
  for _ in range(STEPS):
    state, m = step(state, sharding.to_global(next(batches), batch_sharding))
    metrics.append(m)
  return initial, [float(m["loss"]) for m in metrics], state, run


_REFERENCE = {}


def reference(model: str):
  if model not in _REFERENCE:
    _REFERENCE[model] = train_steps(MODELS[model], (1, 1, 1))
  return _REFERENCE[model]


def shard_shape(x: jax.Array) -> tuple[int, ...]:
  shapes = {s.data.shape for s in x.addressable_shards}
  assert len(shapes) == 1, shapes
  return shapes.pop()


# What the default rules must do, written out: (path, mesh) -> (spec, shape of each device's shard).
EXPECTED = {
  "gpt": {
    "fsdp8": {
      ("token_embed", "embedding"): (P("tensor", "fsdp"), (256, 4)),  # [vocab, embed]: embed over fsdp.
      ("position_embed",): (P(None, "fsdp"), (32, 4)),
      ("block_0", "mlp", "fc", "kernel"): (P("fsdp", "tensor"), (4, 64)),
      ("block_0", "attn", "qkv", "kernel"): (P("fsdp", None, "tensor", None), (4, 3, 2, 16)),
      ("block_1", "ln2", "scale"): (None, (32,)),
    },
    "data2_fsdp2_tensor2": {
      ("token_embed", "embedding"): (P("tensor", "fsdp"), (128, 16)),
      ("block_0", "mlp", "fc", "kernel"): (P("fsdp", "tensor"), (16, 32)),  # Megatron column-parallel.
      ("block_0", "mlp", "fc", "bias"): (P("tensor"), (32,)),
      ("block_0", "mlp", "proj", "kernel"): (P("tensor", "fsdp"), (32, 16)),  # ... and row-parallel.
      ("block_0", "attn", "qkv", "kernel"): (P("fsdp", None, "tensor", None), (16, 3, 1, 16)),  # Heads split.
      ("block_0", "attn", "out", "kernel"): (P("tensor", None, "fsdp"), (1, 16, 16)),
      ("block_1", "ln1", "scale"): (None, (32,)),
    },
    "data8": {
      ("block_0", "mlp", "fc", "kernel"): (None, (32, 64)),  # Pure data parallel: whole copies.
    },
  },
  "cnn": {
    "fsdp8": {
      ("conv_0", "kernel"): (P(None, None, None, "fsdp"), (3, 3, 1, 4)),  # conv_out over fsdp.
      ("conv_1", "kernel"): (P(None, None, None, "fsdp"), (3, 3, 32, 8)),
      ("dense", "kernel"): (P("fsdp", "tensor"), (32, 256)),
      ("head", "kernel"): (None, (256, 10)),
    },
    "data2_fsdp2_tensor2": {
      ("conv_1", "kernel"): (P(None, None, None, "fsdp"), (3, 3, 32, 32)),
      ("dense", "kernel"): (P("fsdp", "tensor"), (128, 128)),
      ("head", "kernel"): (P("tensor", None), (128, 10)),
    },
    "data8": {
      ("conv_1", "kernel"): (None, (3, 3, 32, 64)),
    },
  },
}


def assert_lives_where_the_rules_say(model: str, mesh_name: str, state, run) -> None:
  for path, (spec, shape) in EXPECTED[model][mesh_name].items():
    x = state.params
    for key in path:
      x = x[key]
    assert shard_shape(x) == shape, (path, shard_shape(x), x.sharding)
    if spec is not None:
      assert x.sharding.spec == spec, (path, x.sharding.spec)
  # Every parameter, and each of its Adam moments, carries the sharding the rules give it.
  params, expected = jax.tree.leaves(state.params), jax.tree.leaves(run.shardings.params)
  for name in ("mu", "nu"):
    moments = jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, name))
    assert len(moments) == len(params)
    for p, m, s in zip(params, moments, expected):
      assert p.sharding.is_equivalent_to(s, p.ndim) and m.sharding.is_equivalent_to(s, m.ndim), (p.sharding, s)
      assert shard_shape(m) == shard_shape(p)
  counters = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]  # Adam's and the schedule's counts.
  assert counters
  for x in [state.step, state.rng, *counters]:
    assert x.sharding.is_fully_replicated


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_sharded_training_equals_one_device(model, mesh_name):
  initial_1, losses_1, _, _ = reference(model)
  initial, losses, state, run = train_steps(MODELS[model], MESHES[mesh_name])
  assert dict(run.mesh.shape) == dict(zip(sharding.MESH_AXES, MESHES[mesh_name]))
  # Born sharded from the same seed: bit for bit the 1-device parameters.
  for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(initial_1)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
  assert losses[-1] != losses[0]  # The steps trained.
  assert_lives_where_the_rules_say(model, mesh_name, state, run)


def test_building_a_run_compiles_nothing_and_init_makes_only_shards():
  run = run_lib.build(smoke("gpt_pydocs", "mesh.data=1", "mesh.fsdp=8"))
  with CompileCounter() as counter:
    run_lib.build(smoke("gpt_pydocs", "mesh.data=1", "mesh.fsdp=8"))
  assert counter.count == 0
  state = run.init_state()
  embedding = state.params["token_embed"]["embedding"]
  assert embedding.shape == (256, 32)
  assert all(s.data.shape == (256, 4) for s in embedding.addressable_shards)  # 1/8 of it on each device.


@pytest.mark.parametrize(
  "name, overrides, devices",
  [
    ("gpt_pydocs", [], 1),  # Full size: 0.8M parameters drawn through erf_inv.
    ("gpt_pydocs:smoke", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    ("cnn_digits:smoke", ["mesh.data=1", "mesh.fsdp=8"], 8),
    ("mlp_digits:smoke", ["model.name=resnet", "model.width=8", "model.depth=18"], 1),
    ("gpt_pydocs:smoke", ["model.scan_layers=True", "model.remat=True", "mesh.fsdp=2"], 2),  # nn.scan's vmapped keys.
  ],
)
def test_init_equals_the_default_compilation_bit_for_bit(name, overrides, devices):
  # create_sharded compiles the init with its own options (INIT_COMPILER_OPTIONS): same numbers, sooner.
  experiment, _, variant = name.partition(":")
  config = config_lib.apply_overrides(config_lib.load_experiment(experiment, variant or None), overrides)
  run = run_lib.build(config, jax.devices()[:devices])
  with CompileCounter() as counter:
    state = run.init_state()
  assert counter.count == 1  # One program, for the leaves that are not filled on the host.
  default = jax.jit(run.init_fn, out_shardings=run.shardings)()
  leaves, expected = jax.tree.leaves(state), jax.tree.leaves(default)
  assert len(leaves) == len(expected)
  for a, b in zip(leaves, expected):
    assert a.sharding == b.sharding and a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_fills_constants_and_draws_bits_on_the_host_and_compiles_only_the_rest():
  run = run_lib.build(smoke("gpt_pydocs", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), jax.devices())
  closed = jax.make_jaxpr(run.init_fn)()
  fills = jaxprs.constant_outputs(closed.jaxpr)
  _, program, _ = sharding.host_split(closed)
  assert not any(e.primitive.name.startswith("random_") for e in program.jaxpr.eqns)  # The host draws them all.
  state = run.init_state()
  leaves = jax.tree.leaves_with_path(state)
  assert len(fills) == len(leaves)
  for (path, leaf), fill in zip(leaves, fills):
    name = jax.tree_util.keystr(path)
    drawn = "kernel" in name or "embed" in name or name.startswith(".rng")
    is_moment = ".opt_state" in name
    # Drawn parameters (and the rng) come from the program; biases, norm scales, moments and counts are fills.
    assert (fill is None) == (drawn and not is_moment), name
    if fill is not None:
      np.testing.assert_array_equal(np.asarray(leaf), np.full(leaf.shape, fill, leaf.dtype))
  # The train step takes the host-made leaves as its donated state: no copy, no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    step = train.jit_train_step(run)
    it = run.dataset.train_iterator(batch_size=run.config.train.batch_size, seed=0)
    state, metrics = step(state, sharding.to_global(next(it), sharding.batch_sharding(run.mesh)))
  assert np.isfinite(float(metrics["loss"]))


# --- Activation constraints -----------------------------------------------------------------------


class Constrained(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
    return nn.with_logical_constraint(h, ("batch", "mlp"))


def test_activation_context_makes_model_constraints_take_effect():
  mesh = sharding.make_mesh(mesh_config(4, 1, 2))
  rules = sharding.parse_rules(config_lib.defaults().mesh.rules)
  model, x = Constrained(), jnp.ones((8, 4))
  variables = nn.unbox(model.init(jax.random.key(0), x))
  # Inputs on the mesh, as in training: the abstract mesh of the context then has its devices.
  variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, P()))
  x = jax.device_put(x, sharding.batch_sharding(mesh))

  def forward(v, x):
    with sharding.activation_context(mesh, rules):
      return model.apply(v, x)

  y = jax.jit(forward)(variables, x)
  wanted = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  assert y.sharding.is_equivalent_to(wanted, 2) and shard_shape(y) == (2, 8)
  unconstrained = jax.jit(model.apply)(variables, x)  # No context: the constraint is a no-op.
  assert not unconstrained.sharding.is_equivalent_to(wanted, 2)
  np.testing.assert_allclose(y, unconstrained, rtol=1e-6)
