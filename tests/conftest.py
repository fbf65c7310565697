"""Test setup: 8 simulated CPU devices, strict rank promotion, and jaxcollab's own runtime setup."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One compilation cache per test session, inherited by the CLI processes that tests start: programs
# compiled once are reused across processes, and nothing outside the session is read or written.
os.environ.setdefault("JAXCOLLAB_CACHE", tempfile.mkdtemp(prefix="jaxcollab-test-cache-"))

from jaxcollab import runtime  # noqa: E402  (XLA_FLAGS above must be set first)

runtime.configure(log_level=None)  # The CLI and `jaxcollab.configure()` run this same code.

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
