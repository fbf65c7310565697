"""Exact resume, signals, crashes and device counts with real `jaxcollab train` processes.

Tests jaxcollab/checkpoint.py and the loop in jaxcollab/train.py. Every comparison is exact (every
array bitwise, every metrics.jsonl row except wall-clock throughput) unless the device count changes.
"""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

import checkpoint_runs as runs
import jaxcollab
from jaxcollab import checkpoint, reload

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
  "run, devices, step",
  [
    (runs.MLP, 1, 60),  # After an eval at 40, before the next at 80.
    (runs.RESNET, 1, 3),  # Right after an eval; BatchNorm statistics and augmentation.
    (runs.GPT, 8, 2),  # Before any eval, from a 4x2 mesh on 8 devices; dropout.
  ],
  ids=["mlp", "resnet", "gpt"],
)
def test_resume_equals_uninterrupted(tmp_path_factory, tmp_path, run, devices, step):
  reference = runs.reference(tmp_path_factory, run, devices)
  resumed = str(tmp_path / "resumed")
  runs.copy_until(reference, resumed, step)
  out = runs.train(run[0], resumed, run[1], devices=devices)
  assert f"Resuming from step {step} " in out.stderr
  runs.assert_same_run(resumed, reference)
  for later in (int(e) for e in runs.entries(reference) if e.isdigit() and int(e) > step):
    runs.assert_same_arrays(runs.read_state(resumed, later), runs.read_state(reference, later))
  _, variables, _ = jaxcollab.load(resumed)  # In this 8-device process, whatever saved it.
  saved = runs.read_state(resumed)
  runs.assert_same_arrays(jax.device_get(variables), {k: saved[k] for k in ("params", "batch_stats") if k in saved})
  assert ("batch_stats" in variables) == (run is runs.RESNET)


def test_same_config_and_seed_is_bitwise_reproducible(tmp_path_factory, tmp_path):
  reference = runs.reference(tmp_path_factory, runs.MLP)
  again = str(tmp_path / "again")
  runs.train(runs.MLP[0], again, runs.MLP[1])
  runs.assert_same_run(again, reference)


def _stopped_at(output: str, name: str) -> int:
  lines = [line for line in output.splitlines() if "Stopped by" in line]
  assert len(lines) == 1, output[-3000:]
  match = re.search(
    rf"Stopped by {name} at step (\d+): checkpoint saved in .*; run the same command to resume\.$", lines[0]
  )
  assert match, lines[0]
  return int(match.group(1))


def _finished(workdir) -> list[int]:
  return sorted(int(e) for e in runs.entries(workdir) if e.isdigit())


def test_sigint_and_sigterm_save_exit_0_and_resume_exactly(tmp_path_factory, tmp_path):
  reference = runs.reference(tmp_path_factory, runs.MLP)
  workdir = str(tmp_path / "run")
  # SIGINT during setup (the state initialised, compiling): exits at once, nothing new to save.
  proc = runs.Process(runs.MLP[0], workdir, runs.MLP[1])
  proc.wait_until(lambda: os.path.exists(os.path.join(workdir, "config.json")))
  proc.signal(signal.SIGINT)
  assert proc.wait() == 0, proc.output()[-3000:]
  if "during setup" in proc.output():
    assert "Stopped by SIGINT during setup (nothing saved yet)" in proc.output() and not _finished(workdir)
    # Then SIGINT at the first steps: saves the step reached.
    proc = runs.Process(runs.MLP[0], workdir, runs.MLP[1])
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    proc.wait_until(lambda: os.path.exists(metrics_file) and os.path.getsize(metrics_file) > 0)
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output()[-3000:]
  first = _stopped_at(proc.output(), "SIGINT")
  assert _finished(workdir) == [first] and first < 120
  assert not runs.temporary(workdir)  # The write was awaited before exiting.
  # SIGTERM in the middle of training, after a periodic save.
  proc = runs.Process(runs.MLP[0], workdir, runs.MLP[1])
  proc.wait_until(lambda: any(s >= 40 for s in _finished(workdir)))
  proc.signal(signal.SIGTERM)
  assert proc.wait() == 0, proc.output()[-3000:]
  second = _stopped_at(proc.output(), "SIGTERM")
  assert f"Resuming from step {first} " in proc.output()
  assert 40 <= second < 120 and {first, 40, second} <= set(_finished(workdir))
  runs.train(runs.MLP[0], workdir, runs.MLP[1])
  runs.assert_same_run(workdir, reference)


def test_sigkill_at_any_moment_loses_no_finished_step(tmp_path_factory, tmp_path):
  reference = runs.reference(tmp_path_factory, runs.MLP)
  workdir = str(tmp_path / "run")
  tmp_steps = lambda: [int(e.split(".")[0]) for e in runs.temporary(workdir)]
  kills = [
    lambda: bool(tmp_steps()),  # While its first checkpoint is being written.
    lambda: any(s >= 60 for s in tmp_steps()),  # While a later one is written, with finished ones around.
    lambda: any(s >= 100 for s in _finished(workdir)),  # Right after a save became visible.
  ]
  killed_mid_save = 0
  finished_before: list[int] = []
  for condition in kills:
    proc = runs.Process(runs.MLP[0], workdir, runs.MLP[1])
    proc.wait_until(condition)
    proc.kill()
    if finished_before:
      assert f"Resuming from step {finished_before[-1]} " in proc.output()
    killed_mid_save += bool(runs.temporary(workdir))
    finished = _finished(workdir)
    assert set(finished_before) <= set(finished), (finished_before, finished)
    for step in finished:  # Visible steps are complete: every file matches its checksum.
      checkpoint.verify(os.path.join(runs.checkpoints(workdir), str(step)), step)
    finished_before = finished
  assert killed_mid_save >= 1  # At least one kill hit an unfinished write.
  out = runs.train(runs.MLP[0], workdir, runs.MLP[1])
  assert f"Resuming from step {finished_before[-1]} " in out.stderr
  assert not runs.temporary(workdir)  # Leftovers were deleted at the start.
  assert set(finished_before) <= set(_finished(workdir))
  runs.assert_same_run(workdir, reference)


def _two_processes(workdir: str, port: int) -> list[runs.Process]:
  """The MLP run as 2 processes x 4 devices on 127.0.0.1 (data parallel over all 8)."""
  return [
    runs.Process(
      runs.MLP[0],
      workdir,
      runs.MLP[1],
      devices=4,
      extra=("--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)),
    )
    for i in range(2)
  ]


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
  workdir = str(tmp_path / "run")
  procs = _two_processes(workdir, portpicker.pick_unused_port())
  procs[0].wait_until(lambda: any(s >= 20 for s in _finished(workdir)))
  procs[1].signal(signal.SIGTERM)  # jax's preemption notifier tells process 0 too.
  assert [p.wait() for p in procs] == [0, 0], procs[0].output()[-2000:] + procs[1].output()[-2000:]
  stopped = {_stopped_at(p.output(), "a preemption notice") for p in procs}
  assert len(stopped) == 1  # Both processes stopped at, and saved, the same step.
  step = stopped.pop()
  assert step in _finished(workdir) and step < 120
  data = os.listdir(os.path.join(runs.checkpoints(workdir), str(step), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
  procs = _two_processes(workdir, portpicker.pick_unused_port())
  assert [p.wait() for p in procs] == [0, 0], procs[0].output()[-2000:] + procs[1].output()[-2000:]
  assert all(f"Resuming from step {step} " in p.output() for p in procs)
  assert 120 in _finished(workdir)


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_8_devices_to_1_and_1_to_8(tmp_path_factory, tmp_path):
  # Saved on 8 devices (fsdp 4 x tensor 2): loads in a 1-device process, bitwise.
  gpt = runs.reference(tmp_path_factory, runs.GPT, devices=8)
  out = subprocess.run(
    [sys.executable, os.path.join(runs.HELPERS, "load_checkpoint.py"), gpt, "4", str(tmp_path / "gpt.npz")],
    env=runs.env(1),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report == {"devices": 1, "on": ["cpu:0"], "model": "gpt", "finite": True}
  loaded = dict(np.load(tmp_path / "gpt.npz"))
  saved = _flat(reload.read_state_numpy(reload.resolve(gpt, 4), keys=("params",)))
  assert loaded.keys() == saved.keys()
  for k in saved:
    assert np.array_equal(loaded[k], saved[k]), k
  # ...and training resumes from it on 1 device: close to the 8-device run, though not bitwise.
  one = str(tmp_path / "gpt1")
  runs.copy_until(gpt, one, 4)
  runs.train(runs.GPT[0], one, runs.GPT[1] + ("mesh.fsdp=1", "mesh.tensor=1"), devices=1)
  _assert_close(runs.read_state(one), runs.read_state(gpt))
  # Saved on 1 device: resumes on 8 devices with every parameter sharded 8 ways (fsdp=8).
  mlp = runs.reference(tmp_path_factory, runs.MLP)
  eight = str(tmp_path / "mlp8")
  runs.copy_until(mlp, eight, 60)
  out = runs.train(runs.MLP[0], eight, runs.MLP[1] + ("mesh.fsdp=8",), devices=8)
  assert "Resuming from step 60 " in out.stderr
  meta = json.loads(runs.step_files(eight, 120, "meta")["metadata"])
  assert meta["devices"] == 8 and meta["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  _assert_close(runs.read_state(eight), runs.read_state(mlp))


def _assert_close(a, b) -> None:
  """Same structure and integers; floats equal to float32 rounding over a few steps."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    if np.issubdtype(x.dtype, np.integer):
      assert np.array_equal(x, y), jax.tree_util.keystr(path)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))
