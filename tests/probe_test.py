"""Activation statistics match their definitions on a hand-built layer; linear CKA has CKA's invariances."""

import json
import math
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab import config as config_lib
from jaxcollab import main, probe, seeds
from jaxcollab.models import mlp


def test_statistics_of_a_hand_built_layer():
  # relu(x @ w + b) with a known sign pattern: exactly the negative pre-activations become zeros.
  x = jnp.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.0]])
  w = jnp.array([[1.0, -1.0, 2.0], [0.5, 1.0, -3.0]])
  b = jnp.array([[0.0, 0.5, -1.0]])
  pre = np.asarray(x @ w + b)
  post = np.maximum(pre, 0)
  got = probe.activation_stats(jnp.maximum(x @ w + b, 0), "relu")
  assert got["zero_frac"] == pytest.approx(np.mean(pre <= 0))
  assert got["mean"] == pytest.approx(post.mean()) and got["std"] == pytest.approx(post.std())
  assert math.isnan(got["saturated_frac"])  # ReLU has no saturation defined.
  tanh = probe.activation_stats(jnp.tanh(jnp.array([0.0, 3.0, -3.0, 0.5])), "tanh")
  assert tanh["saturated_frac"] == 0.5 and tanh["zero_frac"] == 0.25  # tanh(±3) = ±0.995.
  sig = probe.activation_stats(jax.nn.sigmoid(jnp.array([-5.0, 5.0, 0.0, 1.0, -4.0])), "sigmoid")
  assert sig["saturated_frac"] == pytest.approx(2 / 5)  # sigmoid(±5) is past 0.01/0.99; sigmoid(-4) = 0.018 is not.


def test_probe_of_an_mlp_matches_a_manual_forward_and_gradient():
  model = mlp.MLP(mlp.MLPConfig(num_classes=3, hidden=4, activation="tanh"))
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x))["params"]
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  config = config_lib.apply_overrides(config_lib.defaults(), ["model.activation=tanh"])
  out = probe.probe(model, {"params": params}, config, {"image": x, "label": labels, "mask": jnp.ones(6)})
  assert list(out) == ["hidden"]
  h = np.tanh(np.asarray(x.reshape(6, -1) @ params["hidden"]["kernel"] + params["hidden"]["bias"][None]))
  assert out["hidden"]["mean"] == pytest.approx(h.mean(), abs=1e-6)
  assert out["hidden"]["std"] == pytest.approx(h.std(), abs=1e-6)

  def loss(p):
    logits = model.apply({"params": p}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g = jax.grad(loss)(params)["hidden"]
  expected = math.sqrt(float(jnp.sum(g["kernel"] ** 2) + jnp.sum(g["bias"] ** 2)))
  assert out["hidden"]["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_cka_invariances():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 12))
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  assert probe.linear_cka(x, x) == pytest.approx(1.0)
  assert probe.linear_cka(x, x @ q) == pytest.approx(1.0)  # Orthogonal transform.
  assert probe.linear_cka(x, 7.5 * x) == pytest.approx(1.0)  # Isotropic scaling.
  assert probe.linear_cka(x, x + 3.0) == pytest.approx(1.0)  # Centering.
  y = rng.normal(size=(64, 12))
  assert probe.linear_cka(x, y) == pytest.approx(probe.linear_cka(y @ q * 2, x), rel=1e-9)
  assert probe.linear_cka(x, y) < 0.5  # Unrelated representations.
  # Not invariant to anisotropic scaling: the property above could fail.
  assert probe.linear_cka(x, x * np.linspace(0.01, 10, 12)) < 0.9
  # Different widths are fine; a different number of examples is not.
  assert 0 < probe.linear_cka(x, x[:, :5]) < 1
  with pytest.raises(ValueError, match="same examples"):
    probe.linear_cka(x, y[:10])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  base = config_lib.load_experiment("mlp_digits", "smoke")
  configs = [config_lib.apply_overrides(base, [f"seed={s}"]) for s in (0, 1)]
  workdirs = [str(root / f"seed_{s}") for s in (0, 1)]
  seeds.train_seeds(configs, workdirs)
  return workdirs


def test_probe_run_is_cached_and_cka_cli_draws_the_map(two_runs, tmp_path, capsys):
  a, b = two_runs
  first = probe.probe_run(a)
  assert set(first["layers"]["hidden"]) == set(probe.STATS)
  assert 0 < first["layers"]["hidden"]["zero_frac"] < 1  # ReLU: some units are off on some examples.
  assert json.loads(pathlib.Path(a, probe.PROBE_FILE).read_text())["step"] == first["step"]
  matrix, names_a, names_b = probe.cka_runs(a, a)
  assert names_a == names_b == ["hidden", "logits"]
  np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=1e-6)
  out = str(tmp_path / "cka.png")
  assert main.main(["cka", a, b, "--out", out]) == 0
  printed = json.loads(capsys.readouterr().out.splitlines()[0])
  assert np.shape(printed) == (2, 2) and all(0 < v <= 1 for row in printed for v in row)
  assert os.path.getsize(out) > 5_000
