"""Tests for jaxcollab/optim.py: schedules, weight-decay masking, clipping, accumulation, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcollab import config as config_lib
from jaxcollab import optim
from jaxcollab.errors import UserError


def _config(**overrides):
  c = config_lib.defaults().optimizer
  for key, value in overrides.items():
    c[key] = value
  return c


def _params():
  return {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}, "norm": {"scale": jnp.ones((2,))}}


def _step(tx, params, grads, state=None):
  """One optimizer step; returns (new params, state)."""
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_warmup_cosine_values():
  c = _config(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=10, end_learning_rate=0.1)
  _, schedule = optim.make_optimizer(c, total_steps=100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  # Halfway through the 90 decay steps the cosine is at the midpoint between peak and end.
  assert float(schedule(55)) == pytest.approx(0.55)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(200)) == pytest.approx(0.1)


def test_warmup_cosine_counts_updates_when_accumulating():
  c = _config(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=10, end_learning_rate=0.0, accumulate_steps=2)
  _, schedule = optim.make_optimizer(c, total_steps=100)
  # 100 micro-steps with 2 per update: 50 updates, the first 5 of them warm up.
  assert float(schedule(5)) == pytest.approx(1.0)
  assert float(schedule(50)) == pytest.approx(0.0, abs=1e-7)
  assert float(schedule(30)) > 0.0


def test_constant_schedule():
  _, schedule = optim.make_optimizer(_config(learning_rate=0.3), total_steps=10)
  assert [float(schedule(s)) for s in (0, 5, 10)] == pytest.approx([0.3, 0.3, 0.3])


def test_adamw_decays_kernels_but_not_biases_or_scales():
  c = _config(name="adamw", learning_rate=0.1, weight_decay=0.5)
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = _params()
  new, _ = _step(tx, params, jax.tree.map(jnp.zeros_like, params))
  # Zero gradients leave Adam's step at zero, so only the decoupled decay moves parameters.
  np.testing.assert_allclose(new["dense"]["kernel"], 2.0 * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
  np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])


def test_decay_mask():
  assert optim.decay_mask(_params()) == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}


def test_adam_has_no_weight_decay():
  tx, _ = optim.make_optimizer(_config(name="adam", learning_rate=0.1, weight_decay=0.5), total_steps=10)
  params = _params()
  new, _ = _step(tx, params, jax.tree.map(jnp.zeros_like, params))
  np.testing.assert_array_equal(new["dense"]["kernel"], params["dense"]["kernel"])


def _sgd(**overrides):
  return _config(**{"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, **overrides})


def test_grad_clipping_caps_the_global_norm():
  tx, _ = optim.make_optimizer(_sgd(grad_clip=1.0), total_steps=10)
  params = {"a": jnp.zeros((2,)), "b": jnp.zeros((2, 2))}
  big = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([[0.0, 4.0], [0.0, 0.0]])}  # Global norm 5.
  new, _ = _step(tx, params, big)
  assert float(optax.tree.norm(new)) == pytest.approx(1.0)
  np.testing.assert_allclose(new["a"], [-0.6, 0.0], rtol=1e-6)  # Direction kept, length capped.
  small = jax.tree.map(lambda g: g / 10, big)  # Norm 0.5: left alone.
  new, _ = _step(tx, params, small)
  np.testing.assert_allclose(new["b"], -small["b"], rtol=1e-6)


def test_clip_equals_optax_exactly_inside_the_norm_and_within_2_ulp_when_it_clips():
  rng = np.random.default_rng(0)
  shapes = {"a": (3,), "b": (17, 5), "c": (2, 3, 4), "d": ()}
  seen = set()
  for scale in (1e-3, 0.01, 0.3, 7.0, 1e4):  # Global norms of about 0.012 to 1.2e5.
    grads = {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in shapes.items()}
    ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    clipped = float(optax.tree.norm(grads)) > 1.0
    seen.add(clipped)
    for k in shapes:
      if clipped:
        np.testing.assert_array_max_ulp(np.asarray(ours[k]), np.asarray(theirs[k]), maxulp=2)
      else:
        np.testing.assert_array_equal(ours[k], theirs[k])
  assert seen == {True, False}
  for special in (0.0, np.inf, np.nan):  # A zero norm leaves zeros; inf and NaN norms give what optax gives.
    grads = {"a": jnp.asarray([special, 0.0, 1.0 if special else 0.0], jnp.float32)}
    ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    np.testing.assert_array_equal(ours["a"], theirs["a"])  # NaN where optax has NaN.
  assert jax.tree.structure(optim.clip_by_global_norm(1.0).init(shapes)) == jax.tree.structure(
    optax.clip_by_global_norm(1.0).init(shapes)
  )  # Same (empty) state: checkpoints written with optax's clip restore.


def test_sgd_plain_momentum_and_nesterov():
  params, grads = {"w": jnp.ones((2,))}, {"w": jnp.asarray([1.0, -2.0])}
  second_updates = {}
  for label, overrides in {
    "plain": {"momentum": 0.0},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
  }.items():
    tx, _ = optim.make_optimizer(_sgd(learning_rate=0.1, **overrides), total_steps=10)
    p1, state = _step(tx, params, grads)
    p2, _ = _step(tx, p1, grads, state)
    second_updates[label] = np.asarray(p2["w"] - p1["w"])
  g = np.asarray(grads["w"])
  np.testing.assert_allclose(second_updates["plain"], -0.1 * g, rtol=1e-6)
  np.testing.assert_allclose(second_updates["momentum"], -0.1 * 1.9 * g, rtol=1e-6)  # trace = g + 0.9 g.
  np.testing.assert_allclose(second_updates["nesterov"], -0.1 * (1 + 0.9 * 1.9) * g, rtol=1e-6)  # g + 0.9 * trace.


def test_accumulation_updates_once_with_the_mean_gradient():
  k = 3
  params = {"w": jnp.asarray([1.0, 2.0, 3.0]), "k": jnp.ones((2, 2))}
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(k)]
  # SGD with momentum: its first update is -lr * g, so a sum instead of a mean would show.
  tx, _ = optim.make_optimizer(_sgd(learning_rate=0.1, momentum=0.9, accumulate_steps=k), total_steps=30)
  p, state = params, tx.init(params)
  for i, g in enumerate(grads):
    p, state = _step(tx, p, g, state)
    if i < k - 1:
      jax.tree.map(np.testing.assert_array_equal, p, params)
  reference_tx, _ = optim.make_optimizer(_sgd(learning_rate=0.1, momentum=0.9), total_steps=30)
  mean_grad = jax.tree.map(lambda *g: sum(g) / k, *grads)
  want, _ = _step(reference_tx, params, mean_grad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p, want)
  assert not np.allclose(p["w"], params["w"])


def test_accumulation_clips_the_mean_gradient():
  tx, _ = optim.make_optimizer(_sgd(grad_clip=1.0, accumulate_steps=2), total_steps=10)
  params = {"w": jnp.zeros((2,))}
  p, state = _step(tx, params, {"w": jnp.asarray([4.0, 0.0])})
  p, _ = _step(tx, p, {"w": jnp.zeros((2,))}, state)
  # Mean [2, 0] clipped to norm 1; clipping each micro-batch instead would give [0.5, 0].
  np.testing.assert_allclose(p["w"], [-1.0, 0.0], rtol=1e-6)


def test_jit_matches_eager():
  tx, _ = optim.make_optimizer(
    _config(
      name="adamw", weight_decay=0.1, schedule="warmup_cosine", warmup_steps=2, grad_clip=1.0, accumulate_steps=2
    ),
    total_steps=10,
  )
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
  eager, _ = _step(tx, params, grads)
  jitted, _ = jax.jit(lambda p, g: _step(tx, p, g))(params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("name", "lamb", "Unknown optimizer.name 'lamb'"),
    ("schedule", "linear", "Unknown optimizer.schedule 'linear'"),
  ],
)
def test_unknown_names_raise_user_error(key, value, match):
  with pytest.raises(UserError, match=match):
    optim.make_optimizer(_config(**{key: value}), total_steps=10)


@pytest.mark.parametrize("warmup,steps,k", [(100, 100, 1), (150, 100, 1), (20, 20, 2)])
def test_warmup_not_shorter_than_training_raises_user_error(warmup, steps, k):
  c = _config(schedule="warmup_cosine", warmup_steps=warmup, accumulate_steps=k)
  with pytest.raises(UserError, match="warmup_steps"):
    optim.make_optimizer(c, total_steps=steps)


def test_fewer_steps_than_accumulation_raises_user_error():
  with pytest.raises(UserError, match="accumulate_steps"):
    optim.make_optimizer(_config(accumulate_steps=4), total_steps=3)


def test_schedule_is_finite_everywhere_for_short_runs():
  c = _config(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=1, end_learning_rate=0.0)
  _, schedule = optim.make_optimizer(c, total_steps=2)
  values = [float(schedule(s)) for s in range(4)]
  assert all(math.isfinite(v) for v in values) and max(values) == pytest.approx(1.0)


def test_warmup_error_names_the_real_train_steps():
  # 19 warmup micro-steps round up to 10 updates of the 10 that 21 steps with k=2 give: rejected,
  # and the message must quote the train.steps the user set, not a derived count.
  c = _config(schedule="warmup_cosine", warmup_steps=19, accumulate_steps=2)
  with pytest.raises(UserError) as e:
    optim.make_optimizer(c, total_steps=21)
  assert "train.steps (21)" in str(e.value)
