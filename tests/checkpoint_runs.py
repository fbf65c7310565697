"""Real `jaxcollab train` processes for the checkpoint and resume tests, and exact comparisons.

Not a test module: tests import it. Reference runs are cached per pytest session, so several
tests compare against one uninterrupted run instead of training it again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(REPO, "tests", "helpers")
THROUGHPUT = ("examples_per_s", "tokens_per_s")  # Wall-clock fields: the only ones allowed to differ.

# A small MLP that trains long enough (about 2 s, 6 saves of 2.5 MB) for signals to land mid-run.
MLP = (
  "mlp_digits.py:smoke",
  (
    "train.steps=120",
    "model.hidden=8192",
    "checkpoint.every=20",
    "checkpoint.keep=10",
    "train.eval_every=40",
    "train.log_every=10",
  ),
)
# BatchNorm statistics and random augmentation in the data pipeline (digits: no download needed).
RESNET = ("resnet_cifar10.py:smoke", ("dataset.name=digits", "dataset.flip=false", "checkpoint.keep=10"))
# Saved from 8 devices as a 4 (fsdp) x 2 (tensor) mesh; dropout exercises the per-step RNG.
GPT = (
  "gpt_pydocs.py:smoke",
  ("mesh.fsdp=4", "mesh.tensor=2", "model.dropout=0.1", "checkpoint.every=2", "checkpoint.keep=10"),
)


def env(devices: int) -> dict[str, str]:
  """This process's environment with exactly `devices` simulated CPU devices."""
  out = dict(os.environ)
  flags = [f for f in out.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  out["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  out["PYTHONUNBUFFERED"] = "1"
  out["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return out


def train_command(experiment: str, workdir: str, overrides: tuple[str, ...] = ()) -> list[str]:
  return [
    sys.executable,
    "-m",
    "jaxcollab.main",
    "train",
    "--config",
    os.path.join(REPO, "experiments", experiment),
    "--workdir",
    str(workdir),
    *[f"--config.{o}" for o in overrides],
  ]


def train(
  experiment: str, workdir: str, overrides: tuple[str, ...] = (), devices: int = 1, expect: int = 0
) -> subprocess.CompletedProcess:
  """Runs `jaxcollab train` to its end in a fresh process and checks the exit code."""
  out = subprocess.run(
    train_command(experiment, workdir, overrides),
    env=env(devices),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == expect, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out


class Process:
  """A `jaxcollab train` process in the background whose output goes to a file."""

  def __init__(
    self, experiment: str, workdir: str, overrides: tuple[str, ...] = (), devices: int = 1, extra: tuple[str, ...] = ()
  ):
    self.workdir = str(workdir)
    self.log = f"{self.workdir}.{time.monotonic_ns()}.log"
    with open(self.log, "w") as f:
      self.proc = subprocess.Popen(
        train_command(experiment, workdir, overrides) + list(extra),
        env=env(devices),
        stdout=f,
        stderr=subprocess.STDOUT,
        text=True,
      )

  def wait_until(self, condition: Callable[[], bool], timeout: float = 120, poll: float = 0.002) -> None:
    """Polls `condition` until true; fails if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f"the process ended (exit {self.proc.returncode}) first:\n{self.output()[-3000:]}")
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f"timed out:\n{self.output()[-3000:]}")
      time.sleep(poll)

  def signal(self, sig: int) -> None:
    self.proc.send_signal(sig)

  def kill(self) -> None:
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(30)

  def wait(self, timeout: float = 180) -> int:
    return self.proc.wait(timeout)

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()


def checkpoints(workdir: str) -> str:
  return os.path.join(str(workdir), "checkpoints")


def entries(workdir: str) -> list[str]:
  d = checkpoints(workdir)
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def temporary(workdir: str) -> list[str]:
  return [e for e in entries(workdir) if ".orbax-checkpoint-tmp" in e]


def read_state(workdir: str, step: int | None = None) -> dict:
  """Every saved array of a step (default: newest) as numpy, read in this process."""
  from jaxcollab import reload  # pylint: disable=g-import-not-at-top

  return reload.read_state_numpy(reload.resolve(str(workdir), step))


def assert_same_arrays(a, b) -> None:
  """Same tree, and every leaf bitwise equal (dtype, shape and every value)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs: max |a-b| {np.max(np.abs(x - y))}"


def rows(workdir: str) -> list[dict]:
  """metrics.jsonl without the wall-clock throughput fields."""
  with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in THROUGHPUT} for line in f if line.strip()]


def step_files(workdir: str, step: int, item: str) -> dict[str, str]:
  d = os.path.join(checkpoints(workdir), str(step), item)
  out = {}
  for name in sorted(os.listdir(d)):
    if name != "commit_success.txt":  # Names the temporary directory it was written in.
      with open(os.path.join(d, name)) as f:
        out[name] = f.read()
  return out


def assert_same_run(resumed: str, reference: str) -> None:
  """Final state bitwise, metrics rows exactly (throughput aside), and the saved data position and meta."""
  assert_same_arrays(read_state(resumed), read_state(reference))
  assert rows(resumed) == rows(reference)
  last = max(int(e) for e in entries(reference) if e.isdigit())
  assert step_files(resumed, last, "data") == step_files(reference, last, "data")
  meta = [json.loads(step_files(w, last, "meta")["metadata"]) for w in (resumed, reference)]
  assert meta[0]["eval"] == meta[1]["eval"] and meta[0]["last_eval"] == meta[1]["last_eval"]


def copy_until(reference: str, workdir: str, step: int) -> None:
  """A copy of a finished run as if it had been stopped right after saving `step`."""
  shutil.copytree(str(reference), str(workdir))
  for e in entries(workdir):
    if e.isdigit() and int(e) > step:
      shutil.rmtree(os.path.join(checkpoints(workdir), e))


_REFERENCES: dict[tuple, str] = {}


def reference(tmp_path_factory, run: tuple[str, tuple[str, ...]], devices: int = 1) -> str:
  """The workdir of an uninterrupted run of `run`, trained once per session in a fresh process."""
  key = (run, devices)
  if key not in _REFERENCES:
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    train(run[0], workdir, run[1], devices=devices)
    _REFERENCES[key] = workdir
  return _REFERENCES[key]
