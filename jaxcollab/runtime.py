"""Runtime setup in one place: XLA flags, the compilation cache, logging, the garbage collector, versions.

The CLI, the tests' conftest and a notebook (`jaxcollab.configure()`) all call `configure`, so the
three run with the same flags. XLA reads XLA_FLAGS when its backend starts: call `configure` before
the first computation (importing jax is fine, running anything on a device is not).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys

from jaxcollab import __version__

# The distributions whose versions every run.json and checkpoint records.
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
_NOISY_LOGGERS = ("absl", "jax", "orbax", "grain", "tensorflow_datasets")

# jaxlib 0.10 routes CPU dots/convs through YNNPACK fusions, which ran our CNN step 2.4x slower on
# x86 CPUs (benchmarks/ynn_fusion.py measures it). Only the CPU backend reads this flag.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)

# What MaxText sets for GPUs (end_to_end/gpu/a3/test_convergence_125m_params.sh), less two that change
# more than speed: `--xla_gpu_enable_command_buffer=` (turns off CUDA graphs, which save launch overhead on
# one GPU) and `--xla_disable_hlo_passes=rematerialization` (can run out of memory). The scheduler and
# double-buffered while loops (model.scan_layers) matter on one GPU; the rest combine and overlap
# collectives across GPUs. Only the GPU backend reads these; every one parses in jaxlib 0.10.2 (tested).
GPU_FLAGS = (
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  "--xla_gpu_enable_triton_gemm=false",
  "--xla_gpu_enable_highest_priority_async_stream=true",
  "--xla_gpu_enable_while_loop_double_buffering=true",
  "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
  "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
  "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
  "--xla_gpu_enable_pipelined_all_gather=true",
  "--xla_gpu_enable_pipelined_reduce_scatter=true",
  "--xla_gpu_enable_pipelined_all_reduce=true",
  "--xla_gpu_enable_all_gather_combine_by_dim=false",
  "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
)
# Python's cyclic collector, as (generation 0, 1, 2) thresholds. At the default (700, 10, 10), importing
# jax and flax, building a run and tracing the gpt_pydocs step made 4 full collections of the millions
# of objects those imports leave, 0.27 s of the 1.5 s before the step's compilation could start; with
# these, none (0.11 s of young collections). Young objects are still collected, every 10,000 allocations.
GC_THRESHOLDS = (10_000, 10, 10)
# Set by pause_gc when it turned the collector off, so that resume_gc turns on only what it turned off.
_gc_paused = False
# Opt-in ("1") until benchmarks/gpt_gpu.py has measured them on a GPU: unmeasured, they are a guess, and
# an XLA that no longer knows one of them aborts the process at start.
GPU_FLAGS_ENV = "JAXCOLLAB_GPU_FLAGS"


# glibc backs large malloc blocks with transparent huge pages when this tunable is set. XLA:CPU
# allocates a step's temporaries as one block (248 MiB for gpt_pydocs) that glibc maps and unmaps
# every step: with 4 KiB pages that was ~61,000 page faults and ~90 ms of kernel time a step, and
# the small GPT trained 25-30% faster with huge pages (torch's eager step: unchanged). glibc reads
# tunables only at process start, hence `restart_with_huge_pages`.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "JAXCOLLAB_HUGE_PAGES"  # "0": keep the process's malloc as it is.


def huge_pages_environ(environ: dict[str, str]) -> dict[str, str] | None:
  """`environ` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES, or None where there is nothing to add.

  None: not glibc, the user set a hugetlb tunable already (theirs wins), or HUGE_PAGES_ENV is "0".
  """
  libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if not libc or "glibc.malloc.hugetlb" in tunables or environ.get(HUGE_PAGES_ENV) == "0":
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)}


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command line with `huge_pages_environ`; returns where nothing changes.

  Call it first thing in a program's entry point, before anything is printed or started: the
  process keeps its pid and arguments, and runs again from the start once.
  """
  environ = huge_pages_environ(dict(os.environ))
  if environ is not None:
    # Only a speed-up: where the interpreter cannot be executed again (a user who may run it only
    # through a path they were given, as `setpriv` to nobody showed), carry on as started.
    with contextlib.suppress(OSError):
      os.execve(sys.executable, sys.orig_argv, environ)


def configure(cache_dir: str | None = None, log_level: int | None = logging.INFO) -> None:
  """Sets the XLA flags per platform, a persistent compilation cache, quiet library logs and GC_THRESHOLDS.

  cache_dir: where compiled programs are kept across processes; None = $JAXCOLLAB_CACHE or
  ~/.cache/jaxcollab/xla; "" = no persistent cache. log_level None leaves logging alone.
  """
  set_xla_flags()
  gc.set_threshold(*GC_THRESHOLDS)
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


def pause_gc() -> None:
  """Turns Python's cyclic collector off for a start-up, until `resume_gc` (after the first step).

  Even at GC_THRESHOLDS, importing jax and tracing the gpt_pydocs step made ~50 young collections,
  0.09 s on the critical path of a 3.5 s cold start (2-core CPU), over objects that nearly all live
  on: modules, traced and lowered programs. Few cycles die before the first step, and none repeat.
  """
  global _gc_paused
  if gc.isenabled():
    gc.disable()
    _gc_paused = True


def resume_gc() -> None:
  """Turns the collector back on if `pause_gc` turned it off; otherwise does nothing."""
  global _gc_paused
  if _gc_paused:
    _gc_paused = False
    gc.enable()


def xla_flags(current: str, gpu: bool) -> str:
  """`current` plus our flags for the platform; a flag the user already set keeps the user's value."""
  names = {f.split("=", 1)[0] for f in current.split()}
  ours = CPU_FLAGS + (GPU_FLAGS if gpu else ())
  return " ".join([current.strip(), *(f for f in ours if f.split("=", 1)[0] not in names)]).strip()


def has_cuda_jax() -> bool:
  """Whether jax's CUDA plugin is installed (then a GPU backend may start; checked without starting jax)."""
  return any(importlib.util.find_spec(name) is not None for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def set_xla_flags() -> None:
  """Adds our flags to the environment's XLA_FLAGS; call before jax's backend starts."""
  gpu = os.environ.get(GPU_FLAGS_ENV, "0") == "1" and has_cuda_jax()
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), gpu)


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
