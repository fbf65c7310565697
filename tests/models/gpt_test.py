"""GPT: exact GPT-2 sizes, causality, dropout, remat, tied heads, Megatron names and KV-cache decoding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcollab.models import gpt as gpt_lib

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
  config = gpt_lib.GPTConfig(vocab_size=50257, tied=tied, **gpt_lib.GPT_SIZES["gpt2-124m"])
  assert count(gpt_lib.GPT(config), 1024) == expected


def test_gpt2_medium_parameter_count():
  # Hugging Face's gpt2-medium: 354,823,168 parameters (tied head).
  config = gpt_lib.GPTConfig(vocab_size=50257, **gpt_lib.GPT_SIZES["gpt2-medium"])
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
  model, x, t = build(), tokens(), 7
  y = x.at[:, t].set((x[:, t] + 1) % TINY["vocab_size"])
  apply = jax.jit(lambda x: model.apply({"params": params()}, x, train=False))
  a, b = np.asarray(apply(x)), np.asarray(apply(y))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:])


def test_dropout_is_random_in_training_and_off_in_evaluation():
  model, x, p = build(dropout=0.3), tokens(), params()
  apply = jax.jit(lambda rng, train: model.apply({"params": p}, x, train=train, rngs={"dropout": rng}),
                  static_argnums=1)
  a, b = apply(jax.random.key(1), True), apply(jax.random.key(2), True)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(apply(jax.random.key(1), False), apply(jax.random.key(2), False))


def test_training_without_dropout_needs_no_rng():
  model, x, p = build(dropout=0.0), tokens(), params()
  apply = jax.jit(lambda train: model.apply({"params": p}, x, train=train, rngs=None), static_argnums=0)
  np.testing.assert_array_equal(apply(True), apply(False))


def test_remat_gives_the_same_loss_and_gradients():
  x, p = tokens(), params()

  def loss_and_grads(model):
    def loss(p):
      logits = model.apply({"params": p}, x, train=True)
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.value_and_grad(loss))(p)

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


def test_kv_cache_decoding_matches_the_full_forward_pass():
  model, x, p = build(), tokens(), params()
  full = jax.jit(lambda x: model.apply({"params": p}, x, train=False))(x)
  # Only the cache's shapes come from init; eval_shape skips computing parameters again.
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False, decode=True))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
  step = jax.jit(lambda cache, x: model.apply({"params": p, "cache": cache}, x, train=False, decode=True,
                                              mutable=["cache"]))
  outs, start = [], 0
  # A prompt first, then single tokens as a sampler feeds them, and a chunk at a non-zero index.
  for n in (5, 1, 1, 3, 1, 1):
    logits, variables = step(cache, x[:, start : start + n])
    cache, start = variables["cache"], start + n
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)
  assert int(cache["index"]) == L
