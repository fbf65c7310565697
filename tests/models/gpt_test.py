"""GPT: exact GPT-2 sizes, causality, dropout, remat, tied heads, Megatron names and KV-cache decoding."""

import collections
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxcollab import config as config_lib
from jaxcollab import main, models, run, sharding
from jaxcollab.errors import ConfigError
from jaxcollab.models import gpt as gpt_lib
from jaxcollab.models import gpt_config

TINY = dict(vocab_size=64, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, context=16)
L = 12


def build(**overrides) -> gpt_lib.GPT:
  return gpt_lib.GPT(gpt_lib.GPTConfig(**{**TINY, **overrides}))


def tokens(seed: int = 0, batch: int = 2, length: int = L) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"], jnp.int32)


@functools.cache
def params():
  model = build()
  key = jax.random.key(0, impl="rbg")  # Compiles faster than threefry on the CPU; same initializers.
  return nn.unbox(jax.jit(lambda x: model.init({"params": key}, x, train=False))(tokens()))["params"]


def count(model: nn.Module, length: int) -> int:
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, length), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("tied, expected", [(True, 124_439_808), (False, 124_439_808 + 50257 * 768)])
def test_gpt2_124m_parameter_count(tied, expected):
  config = gpt_lib.GPTConfig(vocab_size=50257, tied=tied, **gpt_config.GPT_SIZES["gpt2-124m"])
  assert count(gpt_lib.GPT(config), 1024) == expected


def test_gpt2_medium_parameter_count():
  # Hugging Face's gpt2-medium: 354,823,168 parameters (tied head).
  config = gpt_lib.GPTConfig(vocab_size=50257, **gpt_config.GPT_SIZES["gpt2-medium"])
  assert count(gpt_lib.GPT(config), 1024) == 354_823_168


def test_untied_head_is_a_separate_matrix_without_bias():
  shapes = lambda m: jax.eval_shape(lambda: nn.unbox(m.init({"params": jax.random.key(0)}, tokens())))["params"]
  tied, untied = shapes(build()), shapes(build(tied=False))
  assert "head" not in tied
  assert set(untied["head"]) == {"kernel"}
  assert untied["head"]["kernel"].shape == (TINY["embed_dim"], TINY["vocab_size"])


def test_later_positions_get_no_gradient():
  # Position-embedding row s is used only at position s, so d logits[t] / d row s must vanish for s > t.
  model, x, t = build(), tokens(), 5
  p = params()

  def logits_at_t(pos_CxD):
    return model.apply({"params": {**p, "position_embed": pos_CxD}}, x, train=False)[:, t].sum()

  grad_norms = np.linalg.norm(np.asarray(jax.jit(jax.grad(logits_at_t))(p["position_embed"])), axis=-1)
  assert (grad_norms[: t + 1] > 0).all(), grad_norms
  assert (grad_norms[t + 1 :] == 0).all(), grad_norms


def test_changing_a_later_token_leaves_earlier_logits_bitwise_equal():
  model, x, t, p = build(), tokens(), 7, params()  # Outside the jit: params() caches what it returns.
  y = x.at[:, t].set((x[:, t] + 1) % TINY["vocab_size"])
  apply = jax.jit(lambda x: model.apply({"params": p}, x, train=False))
  a, b = np.asarray(apply(x)), np.asarray(apply(y))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:])


def test_dropout_is_random_in_training_and_off_in_evaluation():
  model, x, p = build(dropout=0.3), tokens(), params()
  apply = jax.jit(
    lambda rng, train: model.apply({"params": p}, x, train=train, rngs={"dropout": rng}), static_argnums=1
  )
  a, b = apply(jax.random.key(1), True), apply(jax.random.key(2), True)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(apply(jax.random.key(1), False), apply(jax.random.key(2), False))


def test_training_without_dropout_needs_no_rng():
  model, x, p = build(dropout=0.0), tokens(), params()
  apply = jax.jit(lambda train: model.apply({"params": p}, x, train=train, rngs=None), static_argnums=0)
  np.testing.assert_array_equal(apply(True), apply(False))


def loss_and_grads(model: gpt_lib.GPT):
  """A loss of the model on tokens() and its gradients with respect to params()."""
  x = tokens()

  def loss(p):
    logits = model.apply({"params": p}, x, train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params())


def test_remat_gives_the_same_loss_and_gradients():
  (l0, g0), (l1, g1) = loss_and_grads(build()), loss_and_grads(build(remat=True))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_megatron_logical_names():
  model = build(tied=False)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, tokens(), train=False))["params"]
  specs = nn.get_partition_spec(boxed)
  block = specs["block_0"]
  assert specs["token_embed"]["embedding"] == P("vocab", "embed")
  assert specs["position_embed"] == P(None, "embed")
  assert specs["head"]["kernel"] == P("embed", "vocab")
  assert block["attn"]["qkv"]["kernel"] == P("embed", None, "heads", "kv")
  assert block["attn"]["out"]["kernel"] == P("heads", "kv", "embed")
  assert block["mlp"]["fc"]["kernel"] == P("embed", "mlp")
  assert block["mlp"]["proj"]["kernel"] == P("mlp", "embed")
  assert block["ln1"]["scale"] == P("norm")


def test_gpt2_init_scales_residual_projections():
  p = params()
  fc, proj = p["block_0"]["mlp"]["fc"]["kernel"], p["block_0"]["mlp"]["proj"]["kernel"]
  assert abs(float(jnp.std(fc)) - 0.02) < 0.003
  assert abs(float(jnp.std(proj)) - 0.02 / np.sqrt(2 * TINY["num_layers"])) < 0.002
  assert float(jnp.abs(p["block_0"]["mlp"]["fc"]["bias"]).max()) == 0.0


def test_sequence_longer_than_context_is_a_clear_error():
  with pytest.raises(ValueError, match="exceeds the model context 16"):
    jax.eval_shape(lambda: build().init({"params": jax.random.key(0)}, tokens(length=17), train=False))


def decode_in_chunks(model, p, x, chunks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, dict]:
  """(full forward logits, logits of `x` fed through the KV cache in `chunks`, the final cache)."""
  full = jax.jit(lambda x: model.apply({"params": p}, x, train=False))(x)
  # Only the cache's shapes come from init; eval_shape skips computing parameters again.
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False, decode=True))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
  step = jax.jit(
    lambda cache, x: model.apply({"params": p, "cache": cache}, x, train=False, decode=True, mutable=["cache"])
  )
  outs, start = [], 0
  for n in chunks:
    logits, variables = step(cache, x[:, start : start + n])
    cache, start = variables["cache"], start + n
    outs.append(logits)
  return full, np.concatenate(outs, axis=1), cache


def test_kv_cache_decoding_matches_the_full_forward_pass():
  # A prompt first, then single tokens as a sampler feeds them, and a chunk at a non-zero index.
  full, decoded, cache = decode_in_chunks(build(), params(), tokens(), (5, 1, 1, 3, 1, 1))
  np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-5)
  assert int(cache["index"]) == L


# --- Attention by platform (model.attention) ---------------------------------------------------


@pytest.mark.parametrize(
  "requested, platform, dtype, head_dim, capability, expected",
  [
    ("auto", "cuda", jnp.bfloat16, 64, "9.0", "cudnn"),
    ("auto", "cuda", jnp.bfloat16, 256, "9.0", "cudnn"),  # Hopper allows head dims up to 256 ...
    ("auto", "cuda", jnp.bfloat16, 256, "8.0", "xla"),  # ... Ampere up to 128.
    ("auto", "cuda", jnp.float32, 64, "9.0", "xla"),
    ("auto", "cuda", jnp.bfloat16, 60, "9.0", "xla"),  # Not a multiple of 8.
    ("auto", "rocm", jnp.bfloat16, 64, None, "xla"),
    ("auto", "cpu", jnp.bfloat16, 64, None, "xla"),
    ("auto", "tpu", jnp.bfloat16, 128, None, "xla"),
    ("xla", "cuda", jnp.bfloat16, 64, "9.0", "xla"),
    ("xla", "cpu", jnp.float32, 7, None, "xla"),
    ("cudnn", "cuda", jnp.bfloat16, 128, "8.0", "cudnn"),
  ],
)
def test_attention_implementation_choice(requested, platform, dtype, head_dim, capability, expected):
  assert gpt_lib.attention_implementation(requested, platform, dtype, head_dim, capability) == expected


@pytest.mark.parametrize(
  "requested, platform, dtype, head_dim, needle",
  [
    ("cudnn", "cpu", jnp.bfloat16, 64, "needs an NVIDIA GPU and this run is on cpu"),
    ("cudnn", "cuda", jnp.float32, 64, "needs model.dtype=bfloat16, not float32"),
    ("cudnn", "cuda", jnp.bfloat16, 160, "must be a multiple of 8 and <= 128"),
    ("flash", "cuda", jnp.bfloat16, 64, "model.attention must be one of auto, xla, cudnn, got 'flash'"),
  ],
)
def test_impossible_attention_is_one_sentence(requested, platform, dtype, head_dim, needle):
  with pytest.raises(ConfigError, match=re.escape(needle)) as e:
    gpt_lib.attention_implementation(requested, platform, dtype, head_dim, "8.0")
  assert str(e.value).endswith(".") and ". " not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value, needle", [("cudnn", "needs an NVIDIA GPU"), ("flash", "got 'flash'")])
def test_cli_refuses_cudnn_on_cpu_before_compiling(tmp_path, capsys, value, needle):
  if value == "cudnn" and jax.devices()[0].platform == "gpu":
    pytest.skip("cuDNN is possible here (an H200 ran this file's GPU tests)")
  code = main.main(
    [
      "train",
      "--config",
      "gpt_pydocs:smoke",
      "--workdir",
      str(tmp_path / "w"),
      f"--config.model.attention={value}",
      "--config.model.dtype=bfloat16",
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and needle in err and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_auto_attention_is_xla_on_cpu():
  config = config_lib.defaults()
  config.model.name, config.model.dtype = "gpt", "bfloat16"
  info = collections.namedtuple("Info", "vocab_size seq_len")(64, 16)
  assert models.build(config, info).config.attention == "xla"


def test_xla_attention_matches_a_plain_softmax_reference():
  c = gpt_lib.GPTConfig(**TINY, attention="xla")
  attn = gpt_lib.CausalSelfAttention(c)
  x_BxLxD = jax.random.normal(jax.random.key(3), (2, L, TINY["embed_dim"]))
  p = nn.unbox(attn.init(jax.random.key(4), x_BxLxD))["params"]
  out = np.asarray(attn.apply({"params": p}, x_BxLxD), np.float64)
  H, D = TINY["num_heads"], TINY["embed_dim"]
  K = D // H
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  qkv = np.einsum("bld,dthk->tbhlk", np.asarray(x_BxLxD, np.float64), w["qkv"]["kernel"])
  qkv = qkv + w["qkv"]["bias"].transpose(0, 1, 2)[:, None, :, None, :]
  q, k, v = qkv
  scores = q @ k.swapaxes(-1, -2) / np.sqrt(K) + np.triu(np.full((L, L), -np.inf), 1)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  heads_BxLxHxK = (probs @ v).transpose(0, 2, 1, 3)
  expected = np.einsum("blhk,hkd->bld", heads_BxLxHxK, w["out"]["kernel"]) + w["out"]["bias"]
  np.testing.assert_allclose(out, expected.reshape(2 * L, D), rtol=1e-4, atol=1e-5)


def _gpu_platform():
  return jax.devices()[0].platform


@pytest.mark.skipif(_gpu_platform() != "gpu", reason="needs an NVIDIA GPU: compares cuDNN fused attention with XLA's")
def test_cudnn_and_xla_logits_agree_in_bf16():
  dims = {"vocab_size": 256, "num_layers": 2, "num_heads": 4, "embed_dim": 256, "mlp_dim": 1024, "context": 256}
  x = jax.random.randint(jax.random.key(0), (4, 256), 0, 256, jnp.int32)
  models_ = {a: gpt_lib.GPT(gpt_lib.GPTConfig(**dims, dtype=jnp.bfloat16, attention=a)) for a in ("xla", "cudnn")}
  p = nn.unbox(jax.jit(lambda x: models_["xla"].init({"params": jax.random.key(1)}, x))(x))["params"]
  logits = {a: np.asarray(jax.jit(lambda x, m=m: m.apply({"params": p}, x))(x)) for a, m in models_.items()}
  # bf16 has 8 mantissa bits; logits of this size differ by a few units in their last place.
  np.testing.assert_allclose(logits["cudnn"], logits["xla"], atol=0.05, rtol=0.02)
  grads = {a: jax.jit(jax.grad(lambda p, m=m: m.apply({"params": p}, x).mean()))(p) for a, m in models_.items()}
  g_x, g_c = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads[a])]) for a in ("xla", "cudnn"))
  assert np.linalg.norm(g_c - g_x) <= 0.05 * np.linalg.norm(g_x)


# --- Layer scan (model.scan_layers) ------------------------------------------------------------


@functools.cache
def scanned_params():
  return gpt_lib.scan_params(params(), TINY["num_layers"])


def test_scanned_layout_round_trips_exactly():
  p = params()
  s = scanned_params()
  assert "block_0" not in s and s["blocks"]["block"]["attn"]["qkv"]["kernel"].shape[0] == TINY["num_layers"]
  back = gpt_lib.unscan_params(s, TINY["num_layers"])
  assert jax.tree.structure(back) == jax.tree.structure(p)
  jax.tree.map(np.testing.assert_array_equal, back, p)


def test_scanned_layout_matches_what_the_scanned_model_initialises():
  shapes = jax.eval_shape(lambda: build(scan_layers=True).init({"params": jax.random.key(0)}, tokens()))["params"]
  expected = jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(shapes))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), scanned_params()) == expected


def test_scanned_and_unscanned_models_give_equal_logits_and_gradients():
  x = tokens()

  def loss_and_grads(model, p):
    return jax.jit(jax.value_and_grad(lambda p: model.apply({"params": p}, x, train=False).mean()))(p)

  for extra in ({}, {"remat": True}):
    (l0, g0), (l1, g1) = (
      loss_and_grads(build(**extra), params()),
      loss_and_grads(build(scan_layers=True, **extra), scanned_params()),
    )
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      gpt_lib.unscan_params(g1, TINY["num_layers"]),
      g0,
    )


def test_mapping_converts_optimizer_state_too():
  opt = optax.adamw(1e-3).init(params())
  mapped = gpt_lib.scan_params(opt, TINY["num_layers"])
  assert jax.tree.structure(mapped) == jax.tree.structure(optax.adamw(1e-3).init(scanned_params()))
  jax.tree.map(np.testing.assert_array_equal, gpt_lib.unscan_params(mapped, TINY["num_layers"]), opt)


def test_scanned_logical_names_resolve_with_and_without_a_layers_rule():
  boxed = jax.eval_shape(lambda: build(scan_layers=True).init({"params": jax.random.key(0)}, tokens()))["params"]
  specs = nn.get_partition_spec(boxed)
  block = specs["blocks"]["block"]
  assert block["attn"]["qkv"]["kernel"] == P("layers", "embed", None, "heads", "kv")
  assert block["mlp"]["fc"]["kernel"] == P("layers", "embed", "mlp")
  assert block["ln1"]["scale"] == P("layers", "norm")
  rules = sharding.parse_rules(config_lib.defaults().mesh.rules)
  without = tuple(r for r in rules if r[0] != "layers")
  for r in (rules, without):
    assert nn.logical_to_mesh_axes(("layers", "embed", "mlp"), r) == P(None, "fsdp", "tensor")


def test_scanned_model_shards_on_a_mesh_like_the_unscanned_one():
  config = config_lib.defaults()
  config.model.name, config.dataset.name, config.loss.name = "gpt", "pydocs", "next_token"
  config.model.num_layers, config.model.num_heads, config.model.embed_dim, config.model.mlp_dim = 2, 2, 32, 64
  config.model.context, config.dataset.seq_len, config.train.batch_size = 16, 16, 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.model.scan_layers = True
  built = run.build(config)
  qkv = built.shardings.params["blocks"]["block"]["attn"]["qkv"]["kernel"]
  assert qkv.spec == P(None, "fsdp", None, "tensor", None)


def test_scanned_kv_cache_decoding_matches_the_full_forward_pass():
  full, decoded, _ = decode_in_chunks(build(scan_layers=True), scanned_params(), tokens(), (5, 1, 3, 1, 2))
  np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_logits_come_out_of_a_float32_accumulation(tied):
  model = build(dtype=jnp.bfloat16, tied=tied)
  p = nn.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, tokens())))["params"]
  p = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape, s.dtype) * 0.1, p)
  logits = np.asarray(jax.jit(lambda x: model.apply({"params": p}, x))(tokens()))
  assert logits.dtype == np.float32
  # Rounded to bf16 first, almost no logit would survive a round trip unchanged; accumulated in f32, few do.
  rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(rounded != logits) > 0.9
  full = np.asarray(jax.jit(lambda x: build(tied=tied).apply({"params": p}, x))(tokens()))
  np.testing.assert_allclose(logits, full, atol=0.1 * np.abs(full).max())


@pytest.mark.parametrize("L", [8, 7])  # Two causal query blocks, and one (odd length).
def test_causal_attention_and_its_backward_match_autodiff_of_xla_attention(L):
  keys = jax.random.split(jax.random.key(5), 4)
  q, k, v, dout = (jax.random.normal(key, (2, L, 3, 4)) for key in keys)
  causal = jnp.tril(jnp.ones((L, L), bool))[None, None]
  out, pull = jax.vjp(gpt_lib.causal_attention, q, k, v)
  ref, ref_pull = jax.vjp(lambda q, k, v: gpt_lib.xla_attention(q, k, v, causal), q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for grad, ref_grad in zip(pull(dout), ref_pull(dout)):
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])  # Tall kernels take the transposed gradient dot.
def test_dense_dot_general_has_autodiffs_gradients(shape):
  x = jax.random.normal(jax.random.key(6), (32, shape[0]))
  w = jax.random.normal(jax.random.key(7), shape)
  dims = (((1,), (0,)), ((), ()))
  ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(gpt_lib._dense_dot_general(x, w, dims))), (0, 1))(x, w)  # pylint: disable=protected-access
  ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), (0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --- Token embedding gradient as a one-hot matmul -----------------------------------------------


@pytest.mark.parametrize(
  "platform, vocab, expected",
  [("cuda", 256, True), ("rocm", 256, True), ("tpu", 8192, True), ("cuda", 50257, False), ("cpu", 256, False)],
)
def test_one_hot_embed_grad_choice(platform, vocab, expected):
  assert gpt_lib.one_hot_embed_grad(platform, vocab) is expected


def test_embed_tokens_gradient_counts_repeated_tokens_exactly():
  table = jax.random.normal(jax.random.key(8), (64, 8))
  tokens_BxL = jnp.array([[3, 3, 3, 5], [3, 0, 5, 63]], jnp.int32)  # Repeats, as text has.
  g = jax.random.normal(jax.random.key(9), (2, 4, 8))
  out, pull = jax.vjp(lambda t: gpt_lib.embed_tokens(t, tokens_BxL, jnp.float32), table)
  np.testing.assert_array_equal(out, table[tokens_BxL])
  (grad,) = pull(g)
  expected = np.zeros((64, 8), np.float64)
  np.add.at(expected, np.asarray(tokens_BxL).ravel(), np.asarray(g, np.float64).reshape(-1, 8))
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
  assert not np.asarray(grad)[[1, 2, 4]].any()  # Rows of tokens not in the batch get nothing.


def test_embed_tokens_in_bf16_sums_in_float32():
  # 4096 copies of one token: a bf16 scatter-add (flax's nn.Embed) rounds the running sum; ours does not.
  table = jnp.zeros((16, 4), jnp.float32)
  tokens_BxL = jnp.zeros((1, 4096), jnp.int32)
  g = jnp.full((1, 4096, 4), 1.0 + 2**-7, jnp.bfloat16)  # Exact in bf16.
  ours = jax.grad(lambda t: jnp.sum(gpt_lib.embed_tokens(t, tokens_BxL, jnp.bfloat16) * g))(table)
  flax_way = jax.grad(lambda t: jnp.sum(jnp.take(t.astype(jnp.bfloat16), tokens_BxL, axis=0) * g))(table)
  exact = 4096 * (1.0 + 2**-7)
  np.testing.assert_array_equal(ours[0], exact)
  assert abs(float(flax_way[0, 0]) - exact) > abs(float(ours[0, 0]) - exact)


def test_one_hot_embed_grad_gives_the_models_loss_and_gradients():
  (l0, g0), (l1, g1) = loss_and_grads(build()), loss_and_grads(build(one_hot_embed_grad=True))
  np.testing.assert_array_equal(l0, l1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g0, g1)
