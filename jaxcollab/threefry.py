"""jax's threefry2x32 random bits, drawn with numpy on the host, and the init jaxpr's draws made so.

Why not leave them to XLA: on the CPU, a model's init program spent most of its compilation on the
threefry kernels that draw its parameters (gpt_pydocs: 50 of its 56 kernels), and that compilation
shares the two cores of a cold start with the train step's. Drawn here, the program compiles only
what turns the bits into parameters (uniform, erf_inv, scale), with the same numbers to the bit:
threefry is integer arithmetic, and tests/threefry_test.py pins these functions to jax.random's.
Only jax's defaults are handled (the threefry2x32 implementation, `jax_threefry_partitionable`,
32-bit draws from single keys); for anything else `host_draws` returns None and XLA draws as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import numpy as np

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
KEY_PARITY = np.uint32(0x1BD11BDA)
IMPL = "threefry2x32"


def hash_2x32(key: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Threefry-2x32 (20 rounds) of the counter pairs (x1, x2) under `key` (uint32[2]): `threefry2x32_p`."""
  k1, k2 = np.uint32(key[0]), np.uint32(key[1])
  ks = (k1, k2, k1 ^ k2 ^ KEY_PARITY)
  with np.errstate(over="ignore"):  # uint32 arithmetic wraps around, as XLA's does.
    x = [np.asarray(x1, np.uint32) + ks[0], np.asarray(x2, np.uint32) + ks[1]]
    for i in range(5):
      for r in ROTATIONS[i % 2]:
        x[0] = x[0] + x[1]
        x[1] = x[0] ^ ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r)))
      x[0] = x[0] + ks[(i + 1) % 3]
      x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x[0], x[1]


def seed(value: Any) -> np.ndarray:
  """The key of an integer seed (`jax.random.PRNGKey`): its high and low 32-bit words."""
  v = np.asarray(value)
  high = (v.view(np.uint64) >> np.uint64(32)).astype(np.uint32) if v.dtype.itemsize == 8 else np.uint32(0)
  return np.array([high, v.astype(np.uint32)], np.uint32)


def fold_in(key: np.ndarray, data: Any) -> np.ndarray:
  """`jax.random.fold_in(key, data)`: the hash of the counter pair (0, data)."""
  x1, x2 = hash_2x32(key, np.zeros(1, np.uint32), np.asarray(data).astype(np.uint32).reshape(1))
  return np.concatenate([x1, x2])


def bits(key: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`jax.random.bits(key, shape)` (uint32): each element hashes its 64-bit row-major index."""
  size = int(np.prod(shape, dtype=np.int64))
  index = np.arange(size, dtype=np.uint64)
  x1, x2 = hash_2x32(key, (index >> np.uint64(32)).astype(np.uint32), index.astype(np.uint32))
  return (x1 ^ x2).reshape(shape)


def _random_seed(seeds: np.ndarray, *, impl: Any) -> np.ndarray | None:
  return seed(seeds) if getattr(impl, "name", None) == IMPL and seeds.shape == () else None


def _random_wrap(base: np.ndarray, *, impl: Any) -> np.ndarray | None:
  return base if getattr(impl, "name", None) == IMPL and base.shape == (2,) else None


def _random_fold_in(keys: np.ndarray, msgs: np.ndarray) -> np.ndarray | None:
  return fold_in(keys, msgs) if keys.shape == (2,) and msgs.shape == () else None


def _random_bits(keys: np.ndarray, *, bit_width: int, shape: tuple[int, ...]) -> Callable[[], np.ndarray] | None:
  # Deferred: the bits are an input of the program, wanted only when it runs, not when it compiles.
  return functools.partial(bits, keys, shape) if keys.shape == (2,) and bit_width == 32 else None


# What the host evaluates, by primitive: each returns the value, or None where it cannot match jax.
# A key array is held as its uint32[2] data, as random_unwrap would give it.
RULES: dict[str, Callable[..., Any]] = {
  "random_seed": _random_seed,
  "random_wrap": _random_wrap,
  "random_unwrap": lambda keys: keys,
  "random_fold_in": _random_fold_in,
  "random_bits": _random_bits,
}


def host_draws(closed: jax.extend.core.ClosedJaxpr) -> tuple[jax.extend.core.ClosedJaxpr, list[Any], list[Any]] | None:
  """(the rest of `closed`, its inputs' host values, each output's host value or None), or None.

  The key derivations and the random bits of `closed` (a jaxpr with no inputs whose jit calls are
  inlined: `jaxprs.inline_jits`) are evaluated here; the rest takes the values it needs from them as
  inputs. Bits come deferred, as functions that draw them. None where a draw cannot be made here
  (another PRNG implementation, `jax_threefry_partitionable` off, a batch of keys, other bit widths,
  a key that the rest would use).
  """
  if not jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]  # The context manager's value.
    return None
  jaxpr = closed.jaxpr
  known: dict[int, Any] = {id(v): np.asarray(c) for v, c in zip(jaxpr.constvars, closed.consts)}
  by_id: dict[int, Any] = {id(v): v for v in jaxpr.constvars}
  rest = []
  for eqn in jaxpr.eqns:
    rule = RULES.get(eqn.primitive.name)
    args = [v.val if isinstance(v, jax.extend.core.Literal) else known.get(id(v)) for v in eqn.invars]
    value = None
    if rule is not None and all(x is not None and not callable(x) for x in args):
      value = rule(*map(np.asarray, args), **eqn.params)
    if value is None:
      if eqn.primitive.name.startswith("random_"):
        return None
      rest.append(eqn)
    else:
      (out,) = eqn.outvars
      known[id(out)], by_id[id(out)] = value, out
  needed = {id(v) for eqn in rest for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)}
  inputs = [by_id[i] for i in known if i in needed]
  if any(jax.dtypes.issubdtype(v.aval.dtype, jax.dtypes.prng_key) for v in inputs):
    return None  # A key the program would use itself.
  outputs = [v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Literal) or id(v) not in known]
  program = jaxpr.replace(constvars=[], invars=inputs, outvars=outputs, eqns=rest)
  values = [known.get(id(v)) if not isinstance(v, jax.extend.core.Literal) else None for v in jaxpr.outvars]
  return jax.extend.core.ClosedJaxpr(program, []), [known[id(v)] for v in inputs], values
