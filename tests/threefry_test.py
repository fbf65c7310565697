"""The host's threefry draws equal jax.random's bit for bit, and an init jaxpr's draws move to the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab import jaxprs, threefry

SEEDS = [0, 1, 42, 2**31 - 1, -1, -12345]
SHAPES = [(), (1,), (7,), (3, 5), (4, 32, 128), (2, 3, 0)]


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_is_prngkey(seed):
  np.testing.assert_array_equal(threefry.seed(np.int32(seed)), jax.random.PRNGKey(seed))


@pytest.mark.parametrize("data", [0, 1, 7, 2**32 - 1, 123456789])
def test_fold_in_is_jax_random_fold_in(data):
  key = jax.random.PRNGKey(3)
  expected = jax.random.fold_in(key, np.uint32(data))
  np.testing.assert_array_equal(threefry.fold_in(np.asarray(key), np.uint32(data)), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 5, -1])
def test_bits_are_jax_random_bits(shape, seed):
  key = jax.random.PRNGKey(seed)
  host = threefry.bits(np.asarray(key), shape)
  assert host.shape == shape and host.dtype == np.uint32
  np.testing.assert_array_equal(host, jax.random.bits(key, shape, jnp.uint32))


def flat_jaxpr(fn):
  return jaxprs.inline_jits(jax.make_jaxpr(fn)())


def draws():
  key = jax.random.fold_in(jax.random.PRNGKey(7), 3)
  k1, k2 = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
  return jax.random.normal(k1, (5, 6)) * 0.02, jax.random.uniform(k2, (9,)), jax.random.fold_in(key, 9)


def test_host_draws_leave_the_program_only_what_maps_bits_to_numbers():
  closed = flat_jaxpr(draws)
  program, inputs, values = threefry.host_draws(closed)
  assert not any(e.primitive.name.startswith("random_") for e in program.jaxpr.eqns)
  assert [np.shape(x() if callable(x) else x) for x in inputs] == [(5, 6), (9,)]
  # The last output, a key's data, is known on the host; the program makes the other two.
  assert values[0] is None and values[1] is None
  np.testing.assert_array_equal(values[2], jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 3), 9))
  made = jax.jit(jax.extend.core.jaxpr_as_fun(program))(*[x() if callable(x) else x for x in inputs])
  for a, b in zip(made, jax.jit(draws)()[:2]):
    np.testing.assert_array_equal(a, b)


def test_host_draws_decline_what_they_cannot_match():
  split = flat_jaxpr(lambda: jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[0], (3,)))
  assert threefry.host_draws(split) is None  # random_split: a batch of keys.
  rbg = flat_jaxpr(lambda: jax.random.normal(jax.random.key(0, impl="rbg"), (3,)))
  assert threefry.host_draws(rbg) is None
  with jax.threefry_partitionable(False):
    assert threefry.host_draws(flat_jaxpr(draws)) is None
