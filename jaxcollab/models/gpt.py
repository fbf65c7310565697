"""GPT-2-style decoder-only language model, with a KV cache for token-by-token sampling.

Pre-LN blocks: x + Attention(LN(x)), then x + MLP(LN(x)); learned token and position
embeddings; a final LayerNorm and a head tied to the token embedding (or a separate matrix).
Dense layers see the residual stream as a 2-D [B*L, D] array, which ran up to 2x faster
than [B, L, D] on the CPU (DESIGN.md); attention alone uses the 3-D view.

Decoding (flax lm1b style): `init(..., tokens_BxS, decode=True)` creates a `cache` collection
sized for S positions; then each `apply(..., tokens_BxL, decode=True, mutable=["cache"])`
appends L tokens and returns their logits. Jitted steps cannot check bounds, so the sampler
stops at S tokens (slices past the cache or `context` would clamp, not fail).

Attention takes the implementation that `attention_implementation` picks: cuDNN's fused kernel
(`jax.nn.dot_product_attention`) on NVIDIA GPUs in bf16/fp16, else `causal_attention` (XLA, with a
hand-written backward) and, while decoding from the cache, `xla_attention`.
`scan_layers` runs the blocks as one `nn.scan` (MaxText's scan_layers) so that compile time stays
flat in depth; `scan_params`/`unscan_params` map between the two parameter layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcollab.errors import ConfigError
from jaxcollab.models import activations
from jaxcollab.models.gpt_config import ATTENTION_CHOICES, dims

# Its config part (TASK, config_fields, check, AXIS_KEYS) is gpt_config.py, which imports no jax, so
# a mistake in the model's keys is reported before jax starts (jaxcollab/models/__init__.py).
# Shape letters, used as suffixes on array names:
#   B batch   L query positions   S key/value positions (the cache)   D embed_dim
#   H heads   K head dim (D // H)   F mlp_dim   V vocab_size   C context (learned positions)


def make(model: ml_collections.ConfigDict, info: Any, dtype: Any) -> GPT:
  """GPT-2-style LM over info.vocab_size tokens, sized by model.size or the explicit fields.

  Resolves model.attention for the default device, so an impossible choice fails here, before any compile.
  """
  d = dims(model)
  platform, capability = current_platform()
  attention = attention_implementation(model.attention, platform, dtype, d["embed_dim"] // d["num_heads"], capability)
  return GPT(
    GPTConfig(
      vocab_size=int(info.vocab_size),
      **d,
      dropout=float(model.dropout),
      activation=model.activation,
      tied=bool(model.tied),
      remat=bool(model.remat),
      dtype=dtype,
      attention=attention,
      scan_layers=bool(model.scan_layers),
      one_hot_embed_grad=one_hot_embed_grad(platform, int(info.vocab_size)),
    )
  )


Implementation = Literal["xla", "cudnn"]  # What jax.nn.dot_product_attention accepts.


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """What the GPT needs from the experiment config."""

  vocab_size: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  context: int
  dropout: float = 0.0  # On the embeddings and on each residual branch (GPT-2's embd/resid pdrop).
  activation: str = "gelu"
  tied: bool = True
  remat: bool = False
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32, logits are returned as float32.
  attention: Implementation = "xla"  # The resolved implementation (see attention_implementation).
  scan_layers: bool = False  # One nn.scan over the blocks: params under "blocks" with a leading layer axis.
  one_hot_embed_grad: bool = False  # The token embedding's gradient as a one-hot matmul (see embed_tokens).


_CUDNN_DTYPES = ("bfloat16", "float16")


def attention_implementation(
  requested: str, platform: str, dtype: Any, head_dim: int, compute_capability: str | None = None
) -> Implementation:
  """The `jax.nn.dot_product_attention` implementation for a request on a platform, or a ConfigError.

  `platform` is "cuda", "rocm", "cpu" or "tpu"; `compute_capability` ("9.0") decides cuDNN's head-dim
  limit (256 from Hopper on, else 128), as jax's own check does.
  """
  if requested not in ATTENTION_CHOICES:
    raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {requested!r}.")
  if requested == "xla":
    return "xla"
  dtype_name = jnp.dtype(dtype).name
  hopper = compute_capability is not None and tuple(map(int, compute_capability.split("."))) >= (9, 0)
  head_max = 256 if hopper else 128
  problems = []
  if platform != "cuda":
    problems.append(f"it needs an NVIDIA GPU and this run is on {platform}")
  if dtype_name not in _CUDNN_DTYPES:
    problems.append(f"it needs model.dtype=bfloat16, not {dtype_name}")
  if head_dim % 8 or head_dim > head_max:
    problems.append(f"its head dim (embed_dim / num_heads = {head_dim}) must be a multiple of 8 and <= {head_max}")
  if not problems:
    return "cudnn"
  if requested == "auto":
    return "xla"
  raise ConfigError(f"model.attention=cudnn is impossible here: {'; '.join(problems)}; use model.attention=auto.")


# Largest vocabulary whose embedding gradient is a one-hot matmul on accelerators: its cost, 2·V·D
# FLOPs a token, stays under ~2% of a gpt2-124m step's 6·N.
ONE_HOT_GRAD_MAX_VOCAB = 8192


def one_hot_embed_grad(platform: str, vocab_size: int) -> bool:
  """Whether the token embedding's gradient is a one-hot matmul (`embed_tokens`) rather than a scatter-add.

  On GPUs the scatter-add's atomics collide on repeated tokens: with gpt_pydocs' bytes (runs of
  spaces) it took 23 of a 48 ms gpt2-124m step on an H200, and 1 ms with random tokens. XLA:CPU
  scatters without atomics, and there the matmul would cost more than it saves. TPUs prefer
  the matmul too (MaxText's use_iota_embed).
  """
  return platform in ("cuda", "rocm", "tpu") and vocab_size <= ONE_HOT_GRAD_MAX_VOCAB


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_tokens(table_VxD: jax.Array, tokens_BxL: jax.Array, dtype: Any) -> jax.Array:
  """`table_VxD[tokens_BxL]` in `dtype`, whose gradient is one_hot(tokens)ᵀ·g summed in float32.

  The matmul has no atomics (deterministic, and as fast with repeated tokens as without), and
  it sums in float32 where the scatter-add of flax's `nn.Embed` sums in the compute dtype.
  """
  return jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)


def _embed_tokens_fwd(table_VxD, tokens_BxL, dtype):
  # A zero-width array carries the table's size and dtype (residuals must be arrays).
  return embed_tokens(table_VxD, tokens_BxL, dtype), (tokens_BxL, jnp.zeros((table_VxD.shape[0], 0), table_VxD.dtype))


def _embed_tokens_bwd(dtype, residuals, g_BxLxD):
  tokens_BxL, like_Vx0 = residuals
  one_hot_NxV = jax.nn.one_hot(tokens_BxL.reshape(-1), like_Vx0.shape[0], dtype=dtype)
  g_NxD = g_BxLxD.reshape(-1, g_BxLxD.shape[-1]).astype(dtype)
  # HIGHEST: float32 cotangents keep their bits (GPUs otherwise round them to TF32); bf16 ones are exact anyway.
  d_VxD = jax.lax.dot_general(
    one_hot_NxV,
    g_NxD,
    (((0,), (0,)), ((), ())),
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  return d_VxD.astype(like_Vx0.dtype), None


embed_tokens.defvjp(_embed_tokens_fwd, _embed_tokens_bwd)


def current_platform() -> tuple[str, str | None]:
  """("cuda" | "rocm" | "cpu" | "tpu", compute capability or None) of the default device."""
  device = jax.devices()[0]
  if device.platform == "gpu":
    version = str(getattr(device.client, "platform_version", "")).lower()
    return ("rocm" if "rocm" in version else "cuda"), getattr(device, "compute_capability", None)
  return device.platform, None


def _normal(std: float, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(c: GPTConfig, name: str) -> nn.LayerNorm:
  # Norm scales are tiny and used by every shard, so they are replicated ("norm").
  return nn.LayerNorm(
    epsilon=1e-5,
    dtype=c.dtype,
    param_dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=_zeros(("norm",)),
    name=name,
  )


def _residual_std(c: GPTConfig) -> float:
  # GPT-2 scales the projections into the residual stream so its variance stays O(1) with depth.
  return 0.02 / math.sqrt(2 * c.num_layers)


def xla_attention(
  q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, mask_1x1xLxS: jax.Array
) -> jax.Array:
  """`jax.nn.dot_product_attention(..., mask=mask, implementation="xla")` written out: the same numbers.

  jax's own builds the combined mask at the full [B, H, L, S] size and vmaps over a head-group axis;
  XLA:CPU then copies the scores between layouts, and its forward and backward took 24 ms against
  11 ms for this at gpt_pydocs' attention shape (B 32, L 128, H 4, K 32), bitwise equal in float32.
  As jax's: logits and softmax in float32, probabilities cast back to the value dtype.
  """
  scale = jnp.float32(1 / math.sqrt(q_BxLxHxK.shape[-1]))
  logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32) * scale
  logits_BxHxLxS = jnp.where(mask_1x1xLxS, logits_BxHxLxS, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(v_BxSxHxK.dtype)
  return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS, v_BxSxHxK)


# Training/eval attention, written for XLA:CPU. Two changes against `xla_attention`, measured in the
# gpt_pydocs train step (4 layers, B 32, L 128, H 4, K 32) alternating in one process:
# - Causal query blocks: the first half of the queries sees only the first half of the keys, so a quarter
#   of the [B, H, L, S] scores and their softmax are never computed: 1.03x the step alone.
# - A hand-written backward (FlashAttention's): dS = P * (dP - rowsum(dO * O)), with the forward keeping
#   the unnormalised exp(scores) and dividing the [B, L, H, K] output instead of the [B, H, L, S]
#   probabilities. Autodiff of the softmax made three more passes over [B, H, L, S] arrays; fwd+bwd of one
#   layer's attention went from 18.8 to 8.8 ms alone. Both together: 1.06x the step at gpt_pydocs size.
# Not bitwise equal to jax.nn.dot_product_attention (the division moves); equal within float32 rounding.
ATTENTION_QUERY_BLOCKS = 2


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array) -> jax.Array:
  """Causal softmax attention of L queries on the same L positions; [B, L, H, K] like jax's."""
  L = q_BxLxHxK.shape[1]
  blocks = ATTENTION_QUERY_BLOCKS if L % ATTENTION_QUERY_BLOCKS == 0 else 1
  n = L // blocks
  outs = [
    _causal_block(q_BxLxHxK[:, j * n : (j + 1) * n], k_BxLxHxK[:, : (j + 1) * n], v_BxLxHxK[:, : (j + 1) * n], j * n)
    for j in range(blocks)
  ]
  return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_block(q_BxNxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, offset: int) -> jax.Array:
  """Queries at positions offset .. offset+N-1 attending to keys 0 .. S-1 (those at or before each query)."""
  return _causal_block_fwd(q_BxNxHxK, k_BxSxHxK, v_BxSxHxK, offset)[0]


def _causal_block_fwd(q_BxNxHxK, k_BxSxHxK, v_BxSxHxK, offset):
  N, S, K = q_BxNxHxK.shape[1], k_BxSxHxK.shape[1], q_BxNxHxK.shape[-1]
  scale = jnp.float32(1 / math.sqrt(K))
  scores_BxHxNxS = jnp.einsum("bnhk,bshk->bhns", q_BxNxHxK, k_BxSxHxK, preferred_element_type=jnp.float32) * scale
  mask_NxS = jnp.arange(S)[None, :] <= offset + jnp.arange(N)[:, None]
  scores_BxHxNxS = jnp.where(mask_NxS, scores_BxHxNxS, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
  # Unnormalised probabilities; masked entries are exactly 0 (each row's max is a visible key's score).
  exp_BxHxNxS = jnp.exp(scores_BxHxNxS - jnp.max(scores_BxHxNxS, axis=-1, keepdims=True))
  sum_BxNxHx1 = jnp.sum(exp_BxHxNxS, axis=-1).transpose(0, 2, 1)[..., None]
  out_BxNxHxK = jnp.einsum(
    "bhns,bshk->bnhk", exp_BxHxNxS.astype(v_BxSxHxK.dtype), v_BxSxHxK, preferred_element_type=jnp.float32
  )
  out_BxNxHxK = (out_BxNxHxK / sum_BxNxHx1).astype(v_BxSxHxK.dtype)
  return out_BxNxHxK, (q_BxNxHxK, k_BxSxHxK, v_BxSxHxK, exp_BxHxNxS, sum_BxNxHx1, out_BxNxHxK)


def _causal_block_bwd(offset, residuals, dout_BxNxHxK):
  del offset  # The mask lives on in the exact zeros of exp_BxHxNxS.
  q_BxNxHxK, k_BxSxHxK, v_BxSxHxK, exp_BxHxNxS, sum_BxNxHx1, out_BxNxHxK = residuals
  scale = jnp.float32(1 / math.sqrt(q_BxNxHxK.shape[-1]))
  f32 = jnp.float32
  dprobs_BxHxNxS = jnp.einsum("bnhk,bshk->bhns", dout_BxNxHxK, v_BxSxHxK, preferred_element_type=f32)
  # rowsum(dP * P) = rowsum(dO * O): over K instead of over S.
  dot_BxHxNx1 = jnp.sum(dout_BxNxHxK.astype(f32) * out_BxNxHxK.astype(f32), axis=-1).transpose(0, 2, 1)[..., None]
  inv_sum_BxHxNx1 = (1 / sum_BxNxHx1).transpose(0, 2, 1, 3)
  dscores_BxHxNxS = exp_BxHxNxS * ((dprobs_BxHxNxS - dot_BxHxNx1) * (inv_sum_BxHxNx1 * scale))
  dscores_BxHxNxS = dscores_BxHxNxS.astype(q_BxNxHxK.dtype)
  dq_BxNxHxK = jnp.einsum("bhns,bshk->bnhk", dscores_BxHxNxS, k_BxSxHxK)
  dk_BxSxHxK = jnp.einsum("bhns,bnhk->bshk", dscores_BxHxNxS, q_BxNxHxK)
  dout_scaled_BxNxHxK = (dout_BxNxHxK.astype(f32) / sum_BxNxHx1).astype(v_BxSxHxK.dtype)
  dv_BxSxHxK = jnp.einsum("bhns,bnhk->bshk", exp_BxHxNxS.astype(v_BxSxHxK.dtype), dout_scaled_BxNxHxK)
  return dq_BxNxHxK, dk_BxSxHxK.astype(k_BxSxHxK.dtype), dv_BxSxHxK.astype(v_BxSxHxK.dtype)


_causal_block.defvjp(_causal_block_fwd, _causal_block_bwd)


class CausalSelfAttention(nn.Module):
  """Multi-head causal attention; q/k/v heads and the output projection split over `tensor`."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, decode: bool = False) -> jax.Array:
    """Returns the attention output as [B*L, D]."""
    c = self.config
    B, L, D = x_BxLxD.shape
    H = c.num_heads
    K = D // H
    # nn.Einsum, not nn.DenseGeneral: DenseGeneral initialises a flat 2-D kernel and applies the
    # 4-D logical constraint to it when logical rules are active (flax issue #3676). Same values.
    qkv_BLx3xHxK = nn.Einsum(
      (D, 3, H, K),
      "nd,dthk->nthk",
      dtype=c.dtype,
      param_dtype=jnp.float32,
      kernel_init=_normal(0.02, ("embed", None, "heads", "kv")),
      bias_init=_zeros((None, "heads", "kv")),
      name="qkv",
    )(x_BxLxD.reshape(B * L, D))
    qkv_BLx3xHxK = nn.with_logical_constraint(qkv_BLx3xHxK, ("batch", None, "heads", "kv"))
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BLx3xHxK[:, i].reshape(B, L, H, K) for i in range(3))

    if decode and self.has_variable("cache", "key"):
      # Append this step's keys/values at the cache index; queries see every filled slot up to theirs.
      key: nn.Variable[jax.Array] = self.variable("cache", "key")
      value: nn.Variable[jax.Array] = self.variable("cache", "value")
      index: nn.Variable[jax.Array] = self.variable("cache", "index")
      i = index.value
      k_BxSxHxK = jax.lax.dynamic_update_slice(key.value, k_BxLxHxK.astype(key.value.dtype), (0, i, 0, 0))
      v_BxSxHxK = jax.lax.dynamic_update_slice(value.value, v_BxLxHxK.astype(value.value.dtype), (0, i, 0, 0))
      key.value, value.value, index.value = k_BxSxHxK, v_BxSxHxK, i + L
      S = k_BxSxHxK.shape[1]
      mask_1x1xLxS = (jnp.arange(S)[None, :] <= i + jnp.arange(L)[:, None])[None, None]
      # Always XLA: cuDNN's causal mask is aligned at the top left, so a chunk at offset i > 0 needs this
      # explicit mask, which cuDNN would turn into a dense bias; one-token steps are memory-bound anyway.
      out_BxLxHxK = xla_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_1x1xLxS)
    else:
      if decode:  # First (init) call in decode mode: size the cache from this input's length.
        self.variable("cache", "key", jnp.zeros, k_BxLxHxK.shape, k_BxLxHxK.dtype)
        self.variable("cache", "value", jnp.zeros, v_BxLxHxK.shape, v_BxLxHxK.dtype)
        self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if c.attention == "cudnn":
        out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True, implementation="cudnn"
        )
      else:
        out_BxLxHxK = causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)

    out_BLxHxK = nn.with_logical_constraint(out_BxLxHxK.reshape(B * L, H, K), ("batch", "heads", "kv"))
    return nn.Einsum(
      (H, K, D),
      "nhk,hkd->nd",
      dtype=c.dtype,
      param_dtype=jnp.float32,
      kernel_init=_normal(_residual_std(c), ("heads", "kv", "embed")),
      bias_init=_zeros(("embed",)),
      name="out",
    )(out_BLxHxK)


@jax.custom_vjp
def _matmul(x_NxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  return jax.lax.dot_general(x_NxI, w_IxO, (((1,), (0,)), ((), ())))


def _matmul_fwd(x_NxI, w_IxO):
  return _matmul(x_NxI, w_IxO), (x_NxI, w_IxO)


def _matmul_bwd(residuals, dy_NxO):
  x_NxI, w_IxO = residuals
  dx_NxI = jax.lax.dot_general(dy_NxO, w_IxO, (((1,), (1,)), ((), ())))
  if w_IxO.shape[0] > w_IxO.shape[1]:
    # XLA:CPU's x^T @ dy ran at half speed for a tall [I, O] result: the MLP's proj kernel gradient
    # ([512, 128] over 4096 rows) took 4.8 ms against 2.9 ms for dy^T @ x plus its transpose, 8 ms a
    # gpt_pydocs step (4 layers); at 6x384 the two were equal. The barrier keeps XLA from folding the
    # transpose back into the dot.
    dw_OxI = jax.lax.dot_general(dy_NxO, x_NxI, (((0,), (0,)), ((), ())))
    return dx_NxI, jax.lax.optimization_barrier(dw_OxI).T
  return dx_NxI, jax.lax.dot_general(x_NxI, dy_NxO, (((0,), (0,)), ((), ())))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general` for nn.Dense, with `_matmul`'s kernel gradient for 2-D inputs."""
  plain = dimension_numbers == (((1,), (0,)), ((), ())) and precision is None and preferred_element_type is None
  if lhs.ndim == 2 and plain:
    return _matmul(lhs, rhs)
  return jax.lax.dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )


class FeedForward(nn.Module):
  """fc -> activation -> proj; the hidden axis splits over `tensor` (Megatron column/row)."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x_BLxD: jax.Array) -> jax.Array:
    c = self.config
    dense = lambda features, std, names, name: nn.Dense(
      features,
      dtype=c.dtype,
      param_dtype=jnp.float32,
      kernel_init=_normal(std, names),
      bias_init=_zeros(names[1:]),
      dot_general=_dense_dot_general,
      name=name,
    )
    h_BLxF = activations.get(c.activation)(dense(c.mlp_dim, 0.02, ("embed", "mlp"), "fc")(x_BLxD))
    h_BLxF = nn.with_logical_constraint(h_BLxF, ("batch", "mlp"))
    return dense(c.embed_dim, _residual_std(c), ("mlp", "embed"), "proj")(h_BLxF)


class Block(nn.Module):
  """One pre-LN transformer block."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, train: bool = False, decode: bool = False) -> jax.Array:
    c = self.config
    B, L, D = x_BxLxD.shape
    dropout = nn.Dropout(c.dropout, deterministic=not train)
    # Activations: rows over the batch axes, width whole (the residual stream is never split).
    x_BLxD = nn.with_logical_constraint(x_BxLxD.reshape(B * L, D), ("batch", None))
    h_BxLxD = _layer_norm(c, "ln1")(x_BLxD).reshape(B, L, D)
    x_BLxD = x_BLxD + dropout(CausalSelfAttention(c, name="attn")(h_BxLxD, decode))
    x_BLxD = nn.with_logical_constraint(x_BLxD, ("batch", None))
    x_BLxD = x_BLxD + dropout(FeedForward(c, name="mlp")(_layer_norm(c, "ln2")(x_BLxD)))
    x_BLxD = nn.with_logical_constraint(x_BLxD, ("batch", None))
    return x_BLxD.reshape(B, L, D)


def _block(c: GPTConfig) -> type[Block]:
  # Static positions count `self`: (self, x, train, decode).
  return nn.remat(Block, static_argnums=(2, 3)) if c.remat else Block


class _ScanBlock(nn.Module):
  """Block in nn.scan's (carry, x) -> (carry, y) form; train/decode are static attributes."""

  config: GPTConfig
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, _: None) -> tuple[jax.Array, None]:
    return _block(self.config)(self.config, name="block")(x_BxLxD, self.train, self.decode), None


class GPT(nn.Module):
  """Tokens [B, L] int32 -> next-token logits [B, L, V] float32."""

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, train: bool = False, decode: bool = False) -> jax.Array:
    c = self.config
    B, L = tokens_BxL.shape
    D = c.embed_dim
    if c.embed_dim % c.num_heads:
      raise ValueError(f"num_heads ({c.num_heads}) must divide embed_dim ({c.embed_dim}).")
    if L > c.context:
      raise ValueError(f"Sequence length {L} exceeds the model context {c.context}; raise model.context.")
    embed = nn.Embed(
      c.vocab_size,
      D,
      dtype=c.dtype,
      param_dtype=jnp.float32,
      embedding_init=_normal(0.02, ("vocab", "embed")),
      name="token_embed",
    )
    # The position axis is never sharded (None): every shard needs all positions.
    pos_CxD = self.param("position_embed", _normal(0.02, (None, "embed")), (c.context, D), jnp.float32)
    start: int | jax.Array = 0
    if decode:
      initialized = self.has_variable("cache", "index")
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        start = index.value
        index.value = start + L
    pos_LxD = jax.lax.dynamic_slice(pos_CxD, (start, 0), (L, D)).astype(c.dtype)
    if c.one_hot_embed_grad:
      tokens_BxLxD = embed_tokens(embed.embedding, tokens_BxL, c.dtype)
    else:
      tokens_BxLxD = embed(tokens_BxL)
    x_BxLxD = nn.with_logical_constraint(tokens_BxLxD, ("batch", None, None)) + pos_LxD[None]
    x_BxLxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxLxD)

    if c.scan_layers:
      # One traced block instead of num_layers copies: compile time stays flat in depth. Parameters
      # (and the decode cache) gain a leading layer axis, logically named "layers" (never sharded).
      stack = nn.scan(
        _ScanBlock,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BxLxD, _ = stack(c, train, decode, name="blocks")(x_BxLxD, None)
    else:
      for i in range(c.num_layers):
        x_BxLxD = _block(c)(c, name=f"block_{i}")(x_BxLxD, train, decode)

    x_BLxD = _layer_norm(c, "ln_f")(x_BxLxD.reshape(B * L, D))
    # The head multiplies in the compute dtype but accumulates into float32 logits (MaxText's
    # logits_dot_in_fp32): the softmax sees no bf16 rounding, and no bf16 copy of [B*L, V] is made.
    f32_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
    if c.tied:
      w_VxD = embed.embedding.astype(c.dtype)
      logits_BLxV = f32_dot(x_BLxD.astype(c.dtype), w_VxD, (((1,), (1,)), ((), ())))
    else:
      logits_BLxV = nn.Dense(
        c.vocab_size,
        use_bias=False,  # GPT-2's head has no bias.
        dtype=c.dtype,
        param_dtype=jnp.float32,
        kernel_init=_normal(0.02, ("embed", "vocab")),
        dot_general=f32_dot,
        name="head",
      )(x_BLxD)
    logits_BLxV = nn.with_logical_constraint(logits_BLxV, ("batch", "vocab"))
    return logits_BLxV.reshape(B, L, c.vocab_size).astype(jnp.float32)


def scan_params(tree: Any, num_layers: int) -> Any:
  """Unscanned layout (block_0 .. block_{N-1}) -> scanned (blocks/block, leading layer axis), anywhere in `tree`.

  Works on params and on anything holding param-shaped subtrees (Adam's moments in an optax state).
  """

  def convert(node: Mapping) -> dict:
    blocks = [node[f"block_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in node.items() if not (k.startswith("block_") and k[6:].isdigit())}
    return {**rest, "blocks": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}}

  return _map_dicts(tree, lambda node: "block_0" in node, convert)


def unscan_params(tree: Any, num_layers: int) -> Any:
  """Inverse of `scan_params`: blocks/block with a leading layer axis -> block_0 .. block_{N-1}."""

  def convert(node: Mapping) -> dict:
    stacked = node["blocks"]["block"]
    rest = {k: v for k, v in node.items() if k != "blocks"}
    return {**rest, **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}}

  return _map_dicts(tree, lambda node: "blocks" in node, convert)


def _map_dicts(tree: Any, match, convert) -> Any:
  """Applies `convert` to every mapping in `tree` that `match`es, rebuilding dicts and (named)tuples around it."""
  if isinstance(tree, Mapping):
    if match(tree):
      return convert(tree)
    return (
      type(tree)({k: _map_dicts(v, match, convert) for k, v in tree.items()})
      if isinstance(tree, dict)
      else {k: _map_dicts(v, match, convert) for k, v in tree.items()}
    )
  if isinstance(tree, tuple):
    items = [_map_dicts(v, match, convert) for v in tree]
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
  return tree
