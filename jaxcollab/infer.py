"""Using a trained model: text from a GPT through its KV cache (`sample`), classes for images (`predict`).

Sampling runs one jitted `lax.while_loop` over positions 0 .. S-1 of a fixed [B, S] token buffer,
S being the model's context (its cache size): every prompt length compiles to the same program.
The prompt is fed through the same one-token step that generates (flax lm1b's sampler does the
same): at position t the model reads token t, and token t+1 is the prompt's where the prompt
still has one, else the sampled one. So a batch may hold prompts of different lengths, each
left-aligned. Streaming is an ordered `io_callback` inside that loop, so the text reaches stdout
as it is produced without cutting the loop into Python-driven chunks.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from PIL import Image, UnidentifiedImageError

from jaxcollab import bundle
from jaxcollab.errors import UserError

PyTree = Any
_log = logging.getLogger(__name__)
# Shape letters: B batch (samples or images)   S cache positions (= model context)   V vocabulary

# Class names of the datasets that have them (digits and MNIST classes are the digits themselves).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
  "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
  "fashion_mnist": (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
  ),
}

# ---- Sampling ------------------------------------------------------------------------------------


def _filter_logits(logits_BxV: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Temperature-scaled logits with everything outside the top-k and the top-p nucleus at -inf.

  k and p are traced values (sorting 256 logits is cheap), so other settings reuse the program.
  """
  V = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  in_top_k_V = jnp.arange(V) < k
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V[None, :], sorted_BxV, -jnp.inf), axis=-1)
  # The nucleus: the most likely tokens whose mass before them is below p (the first always stays).
  kept_BxV = in_top_k_V[None, :] & ((jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p)
  threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled_BxV >= threshold_Bx1, scaled_BxV, -jnp.inf)


def choose(
  logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """Next tokens [B]: argmax when temperature is 0, else a draw from the filtered distribution."""
  sampled_B = jax.random.categorical(key, _filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)
  return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


_SINKS: dict[int, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {}  # id -> host function (streaming)
_sink_ids = itertools.count(1)


def _emit(sink: np.ndarray, offset_B: np.ndarray, token_B: np.ndarray, new_B: np.ndarray) -> None:
  # The compiled loop passes the sink's id, not the function, so every call reuses one program.
  _SINKS[int(sink)](offset_B, token_B, new_B)


@functools.partial(jax.jit, static_argnames=("model", "use_cache", "stream"))
def _decode(
  model: nn.Module,
  params: PyTree,
  tokens_BxS: jax.Array,
  lengths_B: jax.Array,
  max_new: jax.Array,
  key: jax.Array,
  temperature: jax.Array,
  top_k: jax.Array,
  top_p: jax.Array,
  sink: jax.Array,
  *,
  use_cache: bool,
  stream: bool,
) -> jax.Array:
  """The token buffer with `max_new` tokens written after each row's prompt."""
  cache = {}
  if use_cache:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens_BxS, decode=True))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total_B = lengths_B + max_new  # Positions filled when row b is done.

  def step(carry):
    t, tokens_BxS, cache = carry
    if use_cache:  # One new position: its keys/values join the cache, attention reads the cache.
      logits_Bx1xV, updated = model.apply(
        {"params": params, "cache": cache},
        jax.lax.dynamic_slice_in_dim(tokens_BxS, t, 1, axis=1),
        decode=True,
        mutable=["cache"],
      )
      logits_BxV, cache = logits_Bx1xV[:, 0], updated["cache"]
    else:  # Full recomputation of the fixed window: the reference (and the benchmark's baseline).
      logits_BxV = jax.lax.dynamic_index_in_dim(model.apply({"params": params}, tokens_BxS), t, axis=1, keepdims=False)
    chosen_B = choose(logits_BxV, jax.random.fold_in(key, t), temperature, top_k, top_p)
    in_prompt_B = t + 1 < lengths_B
    next_B = jnp.where(in_prompt_B, jax.lax.dynamic_index_in_dim(tokens_BxS, t + 1, axis=1, keepdims=False), chosen_B)
    if stream:
      io_callback(_emit, None, sink, t + 1 - lengths_B, next_B, ~in_prompt_B & (t + 1 < total_B), ordered=True)
    return t + 1, jax.lax.dynamic_update_slice_in_dim(tokens_BxS, next_B[:, None], t + 1, axis=1), cache

  _, tokens_BxS, _ = jax.lax.while_loop(
    lambda c: c[0] < jnp.max(total_B) - 1, step, (jnp.zeros((), jnp.int32), tokens_BxS, cache)
  )
  return tokens_BxS


def generate(
  model: nn.Module,
  params: PyTree,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  use_cache: bool = True,
  on_tokens: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> np.ndarray:
  """[B, max_new_tokens] int32 tokens continuing each prompt (token lists that fit the context together).

  `on_tokens(offset_B, token_B, new_B)` is called on the host after every position, in order:
  row b's token number `offset_B[b]` is `token_B[b]` where `new_B[b]` (the rest is prompt or done).
  """
  S = model.config.context
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  if lengths_B.min() < 1 or lengths_B.max() + max_new_tokens > S or max_new_tokens < 1:
    raise ValueError(
      f"Prompts of {lengths_B.min()}..{lengths_B.max()} tokens plus {max_new_tokens} new tokens "
      f"do not fit the context of {S}."
    )
  tokens_BxS = np.zeros((len(prompts), S), np.int32)  # Left-aligned prompts; the rest is overwritten.
  for b, p in enumerate(prompts):
    tokens_BxS[b, : len(p)] = p
  sink = next(_sink_ids) if on_tokens else 0
  if on_tokens:
    _SINKS[sink] = on_tokens
  try:
    out_BxS = _decode(
      model,
      params,
      tokens_BxS,
      lengths_B,
      np.int32(max_new_tokens),
      jax.random.key_data(jax.random.key(seed)),
      np.float32(temperature),
      np.int32(top_k),
      np.float32(top_p),
      np.int32(sink),
      use_cache=use_cache,
      stream=on_tokens is not None,
    )
    out_BxS = np.asarray(jax.device_get(out_BxS))
  finally:
    _SINKS.pop(sink, None)
  return np.stack([out_BxS[b, n : n + max_new_tokens] for b, n in enumerate(lengths_B)])


def _check_sampling(
  temperature: float, top_k: int, top_p: float, num_samples: int, max_new_tokens: int, context: int
) -> None:
  if not temperature >= 0:
    raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}.")
  if top_k < 0:
    raise UserError(f"--top-k must be >= 0 (0 = no limit), got {top_k}.")
  if not 0 < top_p <= 1:
    raise UserError(f"--top-p must be in (0, 1] (1 = no nucleus cut), got {top_p}.")
  if num_samples < 1:
    raise UserError(f"--num-samples must be at least 1, got {num_samples}.")
  if not 1 <= max_new_tokens < context:
    raise UserError(
      f"--max-new-tokens {max_new_tokens} does not fit: the model's context holds {context} tokens, "
      f"prompt included; ask for 1 to {context - 1}."
    )


def sample(
  loaded: bundle.Loaded,
  prompt: str | Sequence[str],
  *,
  max_new_tokens: int = 200,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  num_samples: int = 1,
  seed: int = 0,
  stream: TextIO | None = None,
) -> list[str]:
  """Continuations of `prompt` (num_samples of them, or one per prompt of a list) as text.

  Bytes are the tokens, so text is UTF-8; with `stream`, a single sample is written to it as produced.
  """
  model, variables, config = loaded.model, loaded.variables, loaded.config
  if config.model.name != "gpt":
    raise UserError(
      f"sample needs a language model, but this run is a {config.model.name!r} classifier on "
      f"{config.dataset.name!r}; use `jaxcollab predict` for it."
    )
  prompts = [prompt] * max(num_samples, 1) if isinstance(prompt, str) else list(prompt)
  if not prompts or any(not p for p in prompts):
    raise UserError("The prompt is empty; pass some text with --prompt, e.g. --prompt 'The '.")
  context = model.config.context
  _check_sampling(temperature, top_k, top_p, num_samples, max_new_tokens, context)
  room = context - max_new_tokens
  encoded = []
  for text in prompts:
    data = text.encode("utf-8")
    if len(data) > room:
      _log.warning(
        "The prompt has %d bytes but only %d fit before %d new tokens in the context of %d; keeping its last %d bytes.",
        len(data),
        room,
        max_new_tokens,
        context,
        room,
      )
      data = data[-room:]
    encoded.append(list(data))
  prompts = [bytes(p).decode("utf-8", errors="replace") for p in encoded]  # As the model saw them.
  writer = None
  if stream is not None and len(encoded) == 1:
    stream.write(prompts[0])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # A character may span tokens.

    def writer(offset_B, token_B, new_B):
      del offset_B
      if new_B[0]:
        stream.write(decoder.decode(bytes([int(token_B[0])])))
        stream.flush()

  tokens_BxN = generate(
    model,
    variables["params"],
    encoded,
    max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    on_tokens=writer,
  )
  texts = [bytes(row.astype(np.uint8).tolist()).decode("utf-8", errors="replace") for row in tokens_BxN]
  if stream is not None and writer is not None:
    stream.write("\n")
  elif stream is not None:
    for i, text in enumerate(texts):
      stream.write(f"--- sample {i + 1} of {len(texts)} ---\n{prompts[i]}{text}\n")
  return texts


# ---- Prediction ----------------------------------------------------------------------------------


def _read_array(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"{path!r} is not a readable .npy array ({e}); save it with numpy.save.") from e


def _read_image(path: str, C: int) -> Image.Image:
  try:
    with Image.open(path) as image:
      image.load()
      return image.convert("L" if C == 1 else "RGB")  # Drops alpha; grey <-> colour as training saw it.
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise UserError(
      f"{path!r} cannot be decoded as an image ({type(e).__name__}); pass a PNG, JPEG or .npy file."
    ) from e


def _resize(x_HxWxC: np.ndarray, H: int, W: int) -> np.ndarray:
  if x_HxWxC.shape[:2] == (H, W):
    return x_HxWxC
  # BOX averages the pixels each training pixel covers (how digits' 8x8 counts were made); upscaling is bilinear.
  method = Image.Resampling.BOX if x_HxWxC.shape[0] >= H else Image.Resampling.BILINEAR
  channels = [
    np.asarray(Image.fromarray(x_HxWxC[..., c], mode="F").resize((W, H), method)) for c in range(x_HxWxC.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def to_model_input(item: str | np.ndarray, image_shape: tuple[int, int, int], invert: bool = False) -> np.ndarray:
  """A file (PNG/JPEG/...: Pillow; .npy) or array -> float32 [H, W, C] in [0, 1] as the model was trained on."""
  H, W, C = image_shape
  name = item if isinstance(item, str) else "the array"
  if isinstance(item, str) and not os.path.isfile(item):
    raise UserError(f"Input file {item!r} does not exist; pass PNG, JPEG or .npy files.")
  if isinstance(item, str) and not item.lower().endswith(".npy"):
    x = np.asarray(_read_image(item, C), np.float32) / 255.0
  else:
    x = _read_array(item) if isinstance(item, str) else np.asarray(item)
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 255.0
    elif not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
      raise UserError(f"{name!r} has dtype {x.dtype}; pass uint8 (0..255) or float values in [0, 1].")
    x = x.astype(np.float32)
    if x.size and (x.min() < 0 or x.max() > 1):
      raise UserError(
        f"{name!r} has values in [{x.min():g}, {x.max():g}], but the model was trained on [0, 1]; "
        "divide by 255 or save it as uint8."
      )
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] != C:
    raise UserError(
      f"{name!r} has shape {x.shape}, but the model takes {C}-channel images ([H, W, {C}] or [H, W] "
      f"for one channel); convert it to {C} channel(s)."
    )
  x = np.clip(_resize(x, H, W), 0.0, 1.0)
  return 1.0 - x if invert else x


@functools.partial(jax.jit, static_argnames="model")
def _probabilities(model: nn.Module, variables: PyTree, x_BxHxWxC: jax.Array) -> jax.Array:
  logits_BxK: jax.Array = model.apply(variables, x_BxHxWxC, train=False)  # type: ignore[assignment]  # not mutable.
  return jax.nn.softmax(logits_BxK, axis=-1)


def predict(
  loaded: bundle.Loaded,
  inputs: Sequence[str | np.ndarray],
  *,
  top_k: int = 5,
  invert: bool = False,
) -> list[dict[str, Any]]:
  """[{"input": name, "top": [{"class": i, "name": ..., "probability": p}, ...]}] for each image, top_k classes.

  `invert` flips light and dark, for dark-on-light drawings given to a model trained on light-on-dark digits.
  """
  model, variables, config, dataset = loaded.model, loaded.variables, loaded.config, loaded.dataset
  if dataset["kind"] != "image":
    raise UserError(
      f"predict needs an image classifier, but this run is a {config.model.name!r} language model on "
      f"{dataset['name']!r}; use `jaxcollab sample` for it."
    )
  if not inputs:
    raise UserError("No inputs; pass one or more PNG, JPEG or .npy files.")
  if top_k < 1:
    raise UserError(f"--top-k must be at least 1, got {top_k}.")
  x_BxHxWxC = np.stack([to_model_input(item, tuple(dataset["image_shape"]), invert) for item in inputs])
  probs_BxK = np.asarray(_probabilities(model, variables, x_BxHxWxC))
  names = CLASS_NAMES.get(dataset["name"], tuple(str(i) for i in range(probs_BxK.shape[-1])))
  results = []
  for i, (item, probs_K) in enumerate(zip(inputs, probs_BxK)):
    order = np.argsort(-probs_K, kind="stable")[:top_k]
    results.append(
      {
        "input": item if isinstance(item, str) else f"array {i}",
        "top": [{"class": int(c), "name": names[c], "probability": float(probs_K[c])} for c in order],
      }
    )
  return results
