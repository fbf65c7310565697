"""Sampling through the KV cache and image prediction: properties that would break if either were wrong."""

import io
import logging

import flax.linen as nn
import jax
import jax.monitoring
import numpy as np
import pytest
from PIL import Image

from jaxcollab import bundle, infer
from jaxcollab import config as config_lib
from jaxcollab.errors import UserError
from jaxcollab.models.cnn import CNN, CNNConfig
from jaxcollab.models.gpt import GPT, GPTConfig

C = 48  # The tiny GPT's context (its cache size).


@pytest.fixture(scope="module")
def gpt():
  model = GPT(GPTConfig(vocab_size=256, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, context=C))
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, C), np.int32)))["params"]
  # Larger weights than the 0.02 init: logits far apart, so argmax is not decided by rounding.
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
  config = config_lib.defaults()
  config.model.name, config.dataset.name = "gpt", "pydocs"
  return bundle.Loaded(model, {"params": params}, config, {"name": "pydocs", "kind": "text"}, 0, {})


PROMPTS = [[72, 105, 32], [1] * 11, [200, 3], list(range(40, 60))]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch4"])
def test_greedy_with_cache_equals_full_recomputation(gpt, prompts):
  model, variables = gpt.model, gpt.variables
  cached = infer.generate(model, variables["params"], prompts, 24, temperature=0)
  full = infer.generate(model, variables["params"], prompts, 24, temperature=0, use_cache=False)
  np.testing.assert_array_equal(cached, full)
  assert len(set(map(tuple, cached))) > 1 or len(prompts) == 1  # Rows differ: each follows its own prompt.


def test_each_row_matches_its_own_batch_of_one(gpt):
  model, variables = gpt.model, gpt.variables
  batch = infer.generate(model, variables["params"], PROMPTS, 12, temperature=0)
  alone = infer.generate(model, variables["params"], PROMPTS[3:], 12, temperature=0)
  np.testing.assert_array_equal(batch[3:], alone)  # Left-aligned shorter rows do not disturb the longest.


def test_seed_decides_the_sample(gpt):
  model, variables = gpt.model, gpt.variables
  draw = lambda seed, **kw: infer.generate(model, variables["params"], PROMPTS, 16, seed=seed, **kw)
  np.testing.assert_array_equal(draw(3), draw(3))
  assert not np.array_equal(draw(3), draw(4))
  greedy = draw(0, temperature=0)
  np.testing.assert_array_equal(draw(5, top_k=1), greedy)  # One candidate left: sampling is greedy.
  np.testing.assert_array_equal(draw(6, top_p=1e-6), greedy)  # The nucleus keeps only the likeliest.


def test_filter_keeps_top_k_and_the_nucleus():
  logits = np.log(np.array([[0.5, 0.05, 0.3, 0.15]], np.float32))
  kept = lambda k, p: np.isfinite(np.asarray(infer._filter_logits(logits, np.float32(1), np.int32(k), np.float32(p))))
  np.testing.assert_array_equal(kept(2, 1.0), [[True, False, True, False]])
  np.testing.assert_array_equal(kept(0, 0.7), [[True, False, True, False]])  # 0.5 < 0.7 <= 0.8
  np.testing.assert_array_equal(kept(0, 0.85), [[True, False, True, True]])
  np.testing.assert_array_equal(kept(0, 1.0), [[True] * 4])


def test_another_prompt_length_or_setting_compiles_nothing(gpt):
  infer.sample(gpt, "Hello", max_new_tokens=8, seed=0)
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    infer.sample(gpt, "A much longer prompt", max_new_tokens=20, temperature=0.7, top_k=5, top_p=0.9, seed=1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []


def test_stream_shows_the_returned_text(gpt):
  out = io.StringIO()
  texts = infer.sample(gpt, "Hi", max_new_tokens=10, seed=2, stream=out)
  assert out.getvalue() == "Hi" + texts[0] + "\n"
  many = io.StringIO()
  texts = infer.sample(gpt, "Hi", max_new_tokens=10, num_samples=3, seed=2, stream=many)
  assert len(texts) == 3 and many.getvalue().count("--- sample") == 3


def test_long_prompt_is_cut_from_the_left_with_a_notice(gpt, caplog):
  with caplog.at_level(logging.WARNING):
    text = infer.sample(gpt, "x" * 100 + "end", max_new_tokens=8, temperature=0)
  assert "keeping its last 40 bytes" in caplog.text
  assert text == infer.sample(gpt, "x" * 37 + "end", max_new_tokens=8, temperature=0)


@pytest.mark.parametrize(
  "kwargs, needle",
  [
    ({"prompt": ""}, "prompt is empty"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1]"),
    ({"top_p": 1.5}, "--top-p must be in (0, 1]"),
    ({"temperature": -0.5}, "--temperature must be >= 0"),
    ({"max_new_tokens": C}, "does not fit"),
  ],
)
def test_bad_sampling_requests_are_one_sentence(gpt, kwargs, needle):
  kwargs = {"prompt": "Hi", **kwargs}
  with pytest.raises(UserError, match="^[^\n]*$") as e:
    infer.sample(gpt, kwargs.pop("prompt"), **kwargs)
  assert needle in str(e.value)


# ---- predict ---------------------------------------------------------------------------------------

DIGITS = {"name": "digits", "kind": "image", "image_shape": (8, 8, 1), "num_classes": 10}


@pytest.fixture(scope="module")
def cnn():
  model = CNN(CNNConfig(10, (8,), 16, "relu"))
  variables = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), train=False))
  config = config_lib.defaults()
  config.model.name = "cnn"
  return bundle.Loaded(model, variables, config, DIGITS, 0, {})


def test_image_files_become_training_inputs(tmp_path):
  rng = np.random.default_rng(0)
  digit = rng.integers(0, 256, (8, 8)).astype(np.uint8)
  Image.fromarray(digit).resize((32, 32), Image.Resampling.NEAREST).save(tmp_path / "big.png")
  Image.fromarray(np.stack([digit] * 3, -1)).save(tmp_path / "rgb.jpg", quality=100)
  np.save(tmp_path / "d.npy", digit)
  expected = digit[..., None] / 255.0
  np.testing.assert_allclose(infer.to_model_input(str(tmp_path / "big.png"), (8, 8, 1)), expected, atol=1e-6)
  np.testing.assert_allclose(infer.to_model_input(str(tmp_path / "rgb.jpg"), (8, 8, 1)), expected, atol=0.05)
  np.testing.assert_allclose(infer.to_model_input(str(tmp_path / "d.npy"), (8, 8, 1)), expected, atol=1e-6)
  np.testing.assert_allclose(
    infer.to_model_input(str(tmp_path / "d.npy"), (8, 8, 1), invert=True), 1 - expected, atol=1e-6
  )
  colour = infer.to_model_input(str(tmp_path / "big.png"), (4, 4, 3))  # Grey to RGB, 32x32 averaged to 4x4.
  assert colour.shape == (4, 4, 3) and np.allclose(colour[..., 0], colour[..., 2])
  np.testing.assert_allclose(colour[0, 0, 0], digit[:2, :2].mean() / 255, atol=1e-5)


def test_predict_ranks_classes_by_probability(cnn):
  images = [np.random.default_rng(i).random((8, 8)).astype(np.float32) for i in range(3)]
  results = infer.predict(cnn, images, top_k=10)
  logits = np.asarray(cnn.model.apply(cnn.variables, np.stack(images)[..., None], train=False))
  for r, row in zip(results, logits):
    probs = [t["probability"] for t in r["top"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    assert r["top"][0]["class"] == int(np.argmax(row))


def _junk(d):
  (d / "junk.png").write_bytes(b"no image here")
  return str(d / "junk.png")


def _saved(d, name, array):
  np.save(d / name, array)
  return str(d / name)


@pytest.mark.parametrize(
  "make, needle",
  [
    (_junk, "cannot be decoded"),
    (lambda d: _saved(d, "rgb.npy", np.zeros((8, 8, 3), np.float32)), "1-channel"),
    (lambda d: _saved(d, "big.npy", np.full((8, 8), 16.0)), "trained on [0, 1]"),
    (lambda d: str(d / "missing.png"), "does not exist"),
  ],
)
def test_bad_images_are_one_sentence(cnn, tmp_path, make, needle):
  with pytest.raises(UserError, match="^[^\n]*$") as e:
    infer.predict(cnn, [make(tmp_path)])
  assert needle in str(e.value)


def test_models_refuse_the_other_task(gpt, cnn):
  with pytest.raises(UserError, match="use `jaxcollab predict`"):
    infer.sample(cnn, "Hi")
  with pytest.raises(UserError, match="use `jaxcollab sample`"):
    infer.predict(gpt, ["x.png"])
