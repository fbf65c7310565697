"""XLA flags per platform (ours added once, the user's win, every GPU flag parses here); GC; huge pages."""

import gc
import os
import subprocess
import sys

import pytest

from jaxcollab import runtime


def test_cpu_gets_only_the_cpu_flags():
  assert runtime.xla_flags("", gpu=False).split() == list(runtime.CPU_FLAGS)


def test_gpu_gets_the_maxtext_flags_once():
  flags = runtime.xla_flags("--xla_dump_to=/tmp/x", gpu=True).split()
  assert flags[0] == "--xla_dump_to=/tmp/x"
  assert set(runtime.GPU_FLAGS) <= set(flags) and len(flags) == len(set(flags))
  assert runtime.xla_flags(" ".join(flags), gpu=True).split() == flags  # Idempotent.


def test_a_flag_the_user_set_keeps_the_users_value():
  flags = runtime.xla_flags("--xla_gpu_enable_triton_gemm=true", gpu=True).split()
  assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_gpu_enable_triton_gemm=false" not in flags


def test_every_flag_parses_in_this_jaxlib():
  # XLA aborts the process on an unknown flag; the flag table is shared by the CPU and GPU builds.
  env = dict(os.environ, XLA_FLAGS=runtime.xla_flags("", gpu=True), JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-500:]


def test_gpu_flags_are_opt_in_and_only_with_cuda(monkeypatch):
  monkeypatch.setattr(runtime, "has_cuda_jax", lambda: True)
  for setting, gpu in ((None, False), ("0", False), ("1", True)):
    monkeypatch.setenv("XLA_FLAGS", "")
    if setting is None:
      monkeypatch.delenv(runtime.GPU_FLAGS_ENV, raising=False)
    else:
      monkeypatch.setenv(runtime.GPU_FLAGS_ENV, setting)
    runtime.set_xla_flags()
    assert os.environ["XLA_FLAGS"].split() == runtime.xla_flags("", gpu).split()
  monkeypatch.setattr(runtime, "has_cuda_jax", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  runtime.set_xla_flags()  # Still "1": without jax's CUDA plugin there is no GPU backend to read them.
  assert os.environ["XLA_FLAGS"].split() == list(runtime.CPU_FLAGS)


def test_configure_collects_young_objects_less_often():
  # The CLI and tests run configure (conftest); full collections over jax's objects cost ~0.27 s of a cold start.
  runtime.configure(log_level=None)  # As conftest and the CLI call it.
  assert gc.get_threshold() == runtime.GC_THRESHOLDS and runtime.GC_THRESHOLDS[0] > 700


def test_pause_gc_turns_the_collector_off_until_resume_and_leaves_a_callers_choice():
  assert gc.isenabled()
  runtime.pause_gc()
  assert not gc.isenabled()
  runtime.resume_gc()
  assert gc.isenabled()
  runtime.resume_gc()  # Nothing paused: nothing to do.
  assert gc.isenabled()
  gc.disable()  # Turned off by the caller, not by pause_gc: resume_gc leaves it off.
  try:
    runtime.pause_gc()
    runtime.resume_gc()
    assert not gc.isenabled()
  finally:
    gc.enable()


@pytest.mark.skipif(runtime.huge_pages_environ({}) is None, reason="glibc only")
def test_huge_pages_are_added_to_glibc_tunables_unless_set_or_declined():
  assert runtime.huge_pages_environ({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": runtime.HUGE_PAGES_TUNABLE}
  other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert runtime.huge_pages_environ(other)["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{runtime.HUGE_PAGES_TUNABLE}"
  assert runtime.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # The user's choice wins.
  assert runtime.huge_pages_environ({runtime.HUGE_PAGES_ENV: "0"}) is None


@pytest.mark.skipif(runtime.huge_pages_environ({}) is None, reason="glibc only")
def test_restart_runs_the_same_command_once_more_with_huge_pages():
  code = (
    "import os, sys; print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
    "from jaxcollab import runtime; runtime.restart_with_huge_pages(); print('done')"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.HUGE_PAGES_ENV)}
  out = subprocess.run([sys.executable, "-c", code, "arg"], env=env, capture_output=True, text=True, check=True)
  first, second, done = out.stdout.splitlines()
  pid, tunables, args = first.split(" ", 2)
  assert tunables == "None" and args == "['arg']"
  assert second == f"{pid} {runtime.HUGE_PAGES_TUNABLE} ['arg']"  # Same process, same arguments, huge pages.
  assert done == "done"
