"""XLA flags per platform, in one place; set before jax starts (XLA reads XLA_FLAGS once, at backend start).

Imports nothing heavy, so the CLI and the benchmarks can call it before `import jax`.
"""

from __future__ import annotations

import importlib.util
import os

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

GPU_FLAGS_ENV = "JAXCOLLAB_GPU_FLAGS"  # "0" leaves the GPU flags out (the benchmark measures both ways).


def xla_flags(current: str, gpu: bool) -> str:
  """`current` plus our flags for the platform; a flag the user already set keeps the user's value."""
  names = {f.split("=", 1)[0] for f in current.split()}
  ours = CPU_FLAGS + (GPU_FLAGS if gpu else ())
  return " ".join([current.strip(), *(f for f in ours if f.split("=", 1)[0] not in names)]).strip()


def has_cuda_jax() -> bool:
  """Whether jax's CUDA plugin is installed (then a GPU backend may start; checked without starting jax)."""
  return any(importlib.util.find_spec(name) is not None for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def set_xla_flags() -> None:
  """Adds our flags to the environment's XLA_FLAGS; call before jax starts."""
  gpu = os.environ.get(GPU_FLAGS_ENV, "1") != "0" and has_cuda_jax()
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), gpu)
