"""Jaxpr rewrites: constant outputs found, dead equations dropped, jit calls inlined with the same results."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcollab import jaxprs


def run(closed):
  return jax.jit(jax.extend.core.jaxpr_as_fun(closed))()


def test_only_outputs_drops_the_equations_the_kept_outputs_do_not_need():
  def fn():
    x = jnp.arange(6.0)
    dead = jnp.sin(jnp.cos(x)).sum()  # Needed by the dropped output only.
    return x * 2.0, dead, jnp.zeros((3,))

  closed = jax.make_jaxpr(fn)()
  kept = jaxprs.only_outputs(closed, [0, 2])
  names = {e.primitive.name for e in kept.jaxpr.eqns}
  assert "sin" not in names and "cos" not in names
  assert len(kept.jaxpr.eqns) < len(closed.jaxpr.eqns)
  a, z = jax.extend.core.jaxpr_as_fun(kept)()
  np.testing.assert_array_equal(a, np.arange(6.0) * 2.0)
  np.testing.assert_array_equal(z, np.zeros(3))
  assert jaxprs.constant_outputs(closed.jaxpr) == [None, None, 0.0]


@jax.jit
def normal(key, scale):
  return jax.random.normal(key, (4, 3)) * scale


def nested():
  key = jax.random.PRNGKey(0)
  a = normal(jax.random.fold_in(key, 1), 2.0)
  b = normal(jax.random.fold_in(key, 2), 3.0)  # The same cached body, inlined twice.
  c = jax.lax.scan(lambda carry, x: (carry + normal(key, x).sum(), carry), 0.0, jnp.arange(3.0))[1]
  return a, b, c


def test_inline_jits_flattens_calls_and_keeps_every_value():
  closed = jax.make_jaxpr(nested)()
  flat = jaxprs.inline_jits(closed)
  names = [e.primitive.name for e in flat.jaxpr.eqns]
  assert "random_bits" in names and "scan" in names  # The draws are top-level; the scan stays whole.
  assert not any(n in jaxprs.JIT_PRIMITIVES for n in names)
  for a, b in zip(run(flat), jax.jit(nested)()):
    np.testing.assert_array_equal(a, b)
  outs = [id(v) for e in flat.jaxpr.eqns for v in e.outvars]
  assert len(outs) == len(set(outs))  # Each variable defined once.
