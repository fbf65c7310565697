"""Runtime setup in one place: XLA flags, the compilation cache, logging, and the versions we record.

The CLI, the tests' conftest and a notebook (`jaxcollab.configure()`) all call `configure`, so the
three run with the same flags. XLA reads XLA_FLAGS when its backend starts: call `configure` before
the first computation (importing jax is fine, running anything on a device is not).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform

from jaxcollab import __version__

# The distributions whose versions every run.json and checkpoint records.
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
_NOISY_LOGGERS = ("absl", "jax", "orbax", "grain", "tensorflow_datasets")


def configure(cache_dir: str | None = None, log_level: int | None = logging.INFO) -> None:
  """Sets the CPU fusion flag, a persistent compilation cache and quiet library logs.

  cache_dir: where compiled programs are kept across processes; None = $JAXCOLLAB_CACHE or
  ~/.cache/jaxcollab/xla; "" = no persistent cache. log_level None leaves logging alone.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    # jaxlib 0.10 routes CPU dots/convs through YNNPACK fusions, which ran our CNN step 2.4x slower
    # on x86 CPUs (benchmarks/ynn_fusion.py measures it). Only the CPU backend reads this flag.
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if log_level is not None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in _NOISY_LOGGERS:
      logging.getLogger(name).setLevel(logging.WARNING)
  if cache_dir is None:
    cache_dir = os.environ.get("JAXCOLLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxcollab", "xla"))
  if cache_dir:
    import jax  # pylint: disable=g-import-not-at-top  # After XLA_FLAGS is set above.

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@functools.cache
def versions() -> dict[str, str | None]:
  """jaxcollab's, the libraries' and Python's versions, as run.json and checkpoints record them."""

  out: dict[str, str | None] = {"jaxcollab": __version__}
  for name in VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  out["python"] = platform.python_version()
  return out
