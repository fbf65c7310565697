"""Several real processes: 2 x 4 CPU devices on 127.0.0.1 (gloo) train like 1 process with 8 devices.

Each process is the real CLI (`python -m jaxcollab.main train ... --process_id i`), so this covers
jax.distributed.initialize, per-process data shards assembled with make_array_from_process_local_data,
process-0-only logging, and orbax checkpoints written by both processes and read back by a third,
single-device process. Also the ways joining can fail: each must exit 2 with one sentence, quickly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from jaxcollab import config as config_lib
from jaxcollab import main, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "gpt_pydocs.py") + ":smoke"
# fsdp=4 x tensor=2 spans both processes on both axes: parameters, optimizer state and the
# batch are all split across hosts. A constant schedule, so a longer reference run has the same
# learning rates at the shared steps.
OVERRIDES = [
  "mesh.data=1",
  "mesh.fsdp=4",
  "mesh.tensor=2",
  "optimizer.schedule=constant",
  "train.log_every=1",
  "train.eval_every=3",
  "checkpoint.every=3",
]


def train_args(workdir, port: int, process_id: int, *flags: str, init_timeout: int = 60) -> list[str]:
  """`jaxcollab train` arguments of process `process_id` of a 2-process EXPERIMENT run on 127.0.0.1:port."""
  coordinator = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process_id)]
  return [
    "train",
    "--config",
    EXPERIMENT,
    "--workdir",
    str(workdir),
    *flags,
    *coordinator,
    "--init_timeout",
    str(init_timeout),
  ]


def env(devices: int) -> dict[str, str]:
  # PYTHONFAULTHANDLER: a process stopped with SIGABRT after a timeout prints where it hung.
  return {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAXCOLLAB_CACHE": "",
    "PYTHONUNBUFFERED": "1",
    "PYTHONFAULTHANDLER": "1",
  }


def start(args: list[str], devices: int, log: str) -> subprocess.Popen:
  with open(log, "w") as f:
    return subprocess.Popen(
      [sys.executable, "-m", "jaxcollab.main", *args], env=env(devices), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT
    )


def finish(procs: list[subprocess.Popen], logs: list[str], timeout: float) -> list[int]:
  """Exit codes; kills every process and shows the logs if one has not finished within `timeout`."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.send_signal(signal.SIGABRT)
    time.sleep(3)
    for p in procs:
      p.kill()
    pytest.fail("processes did not finish:\n" + "\n".join(open(log).read()[-3000:] for log in logs))


def rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses(rows_: list[dict], split: str = "train") -> dict[int, float]:
  return {r["step"]: r["loss"] for r in rows_ if r["split"] == split}


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_single_device_process_reads_the_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  port = portpicker.pick_unused_port()
  flags = [
    *(f"--config.{o}" for o in OVERRIDES),
    "--config.train.steps=6",
    "--config.train.steps_per_call=3",  # Stacked batches assembled from both processes (the reference: 1).
  ]
  logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
  procs = [start(train_args(workdir, port, i, *flags, init_timeout=120), 4, logs[i]) for i in range(2)]

  # Meanwhile, the reference: this process's 8 devices, same mesh, two steps longer.
  config = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT), OVERRIDES + ["train.steps=8"])
  train.train_and_evaluate(config, str(tmp_path / "reference"))
  reference = rows(str(tmp_path / "reference"))

  assert finish(procs, logs, timeout=300) == [0, 0], [open(log).read()[-3000:] for log in logs]
  got = rows(workdir)
  # Process 0 alone writes the logs: every (step, split) row exactly once, one TensorBoard file.
  keys = [(r["step"], r["split"]) for r in got]
  assert len(keys) == len(set(keys)), keys
  assert sorted(losses(got)) == [1, 2, 3, 4, 5, 6]
  for step, loss in losses(got).items():
    np.testing.assert_allclose(loss, losses(reference)[step], rtol=1e-5, err_msg=f"train loss at step {step}")
  for step, loss in losses(got, "eval").items():
    np.testing.assert_allclose(loss, losses(reference, "eval")[step], rtol=1e-5, err_msg=f"eval loss at step {step}")
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert os.path.exists(os.path.join(workdir, "plots", "curves.png"))
  with open(os.path.join(workdir, "run.json")) as f:
    run_info = json.load(f)
  assert run_info["process_count"] == 2 and run_info["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert "step 6/6" in open(logs[0]).read() and "step 6/6" not in open(logs[1]).read()  # Progress: process 0.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]

  # A third process with one device restores step 6, written by both processes, and evaluates it.
  out = subprocess.run(
    [sys.executable, "-m", "jaxcollab.main", "eval", "--workdir", workdir],
    env=env(1),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout[out.stdout.index("{") :])
  np.testing.assert_allclose(result["loss"], losses(got, "eval")[6], rtol=1e-5)


def test_unreachable_coordinator_and_missing_peer_exit_2_with_a_sentence(tmp_path):
  # Process 1 finds nobody at the coordinator address; process 0 (the coordinator) waits for a
  # process 1 that never comes. JAX alone would abort (LOG(FATAL)) or wait for minutes.
  procs, logs = [], []
  for process_id in (1, 0):
    logs.append(str(tmp_path / f"process_{process_id}.log"))
    args = train_args(tmp_path / f"w{process_id}", portpicker.pick_unused_port(), process_id, init_timeout=5)
    procs.append(start(args, 4, logs[-1]))
  began = time.monotonic()
  assert finish(procs, logs, timeout=60) == [2, 2], [open(log).read()[-2000:] for log in logs]
  assert time.monotonic() - began < 30
  unreachable, missing = (open(log).read() for log in logs)
  assert "Could not reach the coordinator at 127.0.0.1:" in unreachable and "within 5 s" in unreachable
  assert "Not all 2 processes joined" in missing and "within 5 s" in missing
  for text in (unreachable, missing):
    assert "Traceback" not in text and "Check failure" not in text, text


def test_processes_with_different_configs_stop_with_a_sentence(tmp_path):
  # A different override on one host would otherwise train two programs that hang on each other.
  port, workdir = portpicker.pick_unused_port(), str(tmp_path / "run")
  logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
  procs = [start(train_args(workdir, port, i, f"--config.seed={i}"), 4, logs[i]) for i in range(2)]
  assert finish(procs, logs, timeout=120) == [2, 2], [open(log).read()[-2000:] for log in logs]
  for log in logs:
    assert "The config differs between process 0 and process(es) [1]" in open(log).read()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--num_processes", "2", "--process_id", "2"], "--process_id=2 is out of range for --num_processes=2"),
    (["--num_processes", "2", "--process_id", "-1"], "--process_id=-1 is out of range"),
    (["--num_processes", "0", "--process_id", "0"], "--num_processes must be >= 1"),
    (["--coordinator_address", "localhost", "--num_processes", "2", "--process_id", "1"], "must be HOST:PORT"),
  ],
)
def test_bad_process_flags_exit_2_before_joining(flags, message, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("JAXCOLLAB_CACHE", "")  # main() would otherwise turn on the persistent cache here.
  monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])  # ... and append to XLA_FLAGS; put it back after.
  code = main.main(["train", "--config", EXPERIMENT, "--workdir", str(tmp_path), *flags])
  assert code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err
  assert not jax.distributed.is_initialized()
