"""The workdir contract's parts: the lock, what counts as a workdir, the config comparison, the segments."""

import json
import os
import signal
import subprocess
import sys

import pytest

from jaxcollab import config as config_lib
from jaxcollab import stop as stop_lib
from jaxcollab import workdir as workdir_lib
from jaxcollab.errors import UserError


def test_lock_is_exclusive_names_its_holder_and_empties_on_release(tmp_path):
  first = workdir_lib.Lock(str(tmp_path))
  assert first.acquire() is None
  holder = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())
  assert holder["pid"] == os.getpid() and holder["host"]
  with pytest.raises(workdir_lib.WorkdirError, match=f"is in use by pid {os.getpid()} on host"):
    workdir_lib.Lock(str(tmp_path)).acquire()
  first.release()
  first.release()  # Twice is harmless.
  assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == ""
  second = workdir_lib.Lock(str(tmp_path))
  assert second.acquire() is None  # A clean release leaves no notice for the next holder.
  second.release()


def test_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path):
  code = (
    "import sys, time; from jaxcollab import workdir; workdir.Lock(sys.argv[1]).acquire(); print('held', "
    "flush=True); time.sleep(60)"
  )
  proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {proc.pid}"):
    workdir_lib.Lock(str(tmp_path)).acquire()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock = workdir_lib.Lock(str(tmp_path))
  notice = lock.acquire()
  assert notice and f"left by pid {proc.pid}" in notice and "no longer running" in notice
  lock.release()


def test_what_counts_as_a_workdir(tmp_path):
  assert not workdir_lib.is_workdir(str(tmp_path))
  (tmp_path / "run.json").write_text(json.dumps({"versions": {"transformers": "4"}}))
  assert not workdir_lib.is_workdir(str(tmp_path))  # Another tool's run.json.
  (tmp_path / "run.json").write_text(json.dumps({"versions": {"jaxcollab": "0.1.0"}}))
  assert workdir_lib.is_workdir(str(tmp_path))
  os.remove(tmp_path / "run.json")
  os.mkdir(tmp_path / "checkpoints")
  (tmp_path / "checkpoints" / "epoch=1.ckpt").write_text("")  # Another framework's checkpoints.
  assert not workdir_lib.is_workdir(str(tmp_path))
  os.remove(tmp_path / "checkpoints" / "epoch=1.ckpt")
  for name in ("500", "1000.orbax-checkpoint-tmp-17", ".deleted", "20.corrupt"):
    os.mkdir(tmp_path / "checkpoints" / name)
  assert workdir_lib.is_workdir(str(tmp_path))
  workdir_lib.check_owned(str(tmp_path / "new"))  # Missing or empty directories are fine.


def _config(**changes):
  c = config_lib.defaults()
  for key, value in changes.items():
    section, name = key.split("__") if "__" in key else (None, key)
    (c[section] if section else c)[name] = value
  return c


def test_config_changes_compare_json_values_of_keys_both_have():
  saved = json.loads(config_lib.to_json(_config()))
  saved["model"]["hidden"] = 1024  # A model field the new config's model does not have: ignored.
  changes = workdir_lib.config_changes(saved, _config(seed=3, train__steps=2000))
  assert changes == {"seed": [0, 3], "train.steps": [1000, 2000]}
  assert workdir_lib.config_changes(saved, _config()) == {}


def test_check_resume_refuses_computation_keys_and_allows_the_rest(tmp_path):
  saved = json.loads(config_lib.to_json(_config()))
  allowed = _config(train__steps=2000, checkpoint__keep=9, mesh__fsdp=2, train__eval_every=7)
  assert set(workdir_lib.check_resume(saved, allowed, 10, "W")) == {
    "train.steps",
    "checkpoint.keep",
    "mesh.fsdp",
    "train.eval_every",
  }
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check_resume(saved, _config(seed=3, optimizer__learning_rate=0.5), 10, "W")
  assert str(e.value) == (
    "Resuming W from step 10 would change how its checkpoints were computed (optimizer.learning_rate 0.001 -> "
    "0.5, seed 0 -> 3); rerun with the values it was trained with, pass a new --workdir, or allow it "
    "deliberately with --config.train.allow_changes=optimizer.learning_rate,seed."
  )
  kernel = json.loads(config_lib.to_json(_config()))
  kernel["model"]["attention"] = "cudnn"
  new = _config()
  new.model.attention = "xla"
  assert workdir_lib.check_resume(kernel, new, 10, "W", portable=("model.attention",)) == {
    "model.attention": ["cudnn", "xla"]
  }
  deliberate = _config(seed=3, optimizer__learning_rate=0.5, train__allow_changes="seed, optimizer.*")
  assert set(workdir_lib.check_resume(saved, deliberate, 10, "W")) == {
    "seed",
    "optimizer.learning_rate",
    "train.allow_changes",
  }


def test_allow_changes_names_real_keys_only():
  assert workdir_lib.parse_allow_changes(" seed ,optimizer.* ") == ("seed", "optimizer.*")
  with pytest.raises(UserError, match="'optimizer.lr', which is not a config key"):
    workdir_lib.parse_allow_changes("optimizer.lr")
  with pytest.raises(UserError, match="'nothing.\\*'"):
    workdir_lib.parse_allow_changes("nothing.*")


def test_segments_accumulate_in_run_json(tmp_path):
  for start, end in ((0, 10), (10, 25)):
    wd = workdir_lib.Workdir(str(tmp_path)).open()
    wd.begin_segment(start, ["jaxcollab", "train"], {"train.steps": [10, 25]} if start else {}, devices=1)
    wd.end_segment(end, "finished")
    wd.close()
  segments = workdir_lib.read_run_info(str(tmp_path))["segments"]
  assert [(s["start_step"], s["end_step"], s["status"]) for s in segments] == [
    (0, 10, "finished"),
    (10, 25, "finished"),
  ]
  assert segments[1]["config_changes"] == {"train.steps": [10, 25]} and segments[1]["pid"] == os.getpid()


def test_stop_outside_setup_only_asks_and_abandons_evaluations():
  before = signal.getsignal(signal.SIGTERM)
  with stop_lib.Stop() as stop:
    stop.phase = stop_lib.TRAIN  # Outside setup a signal never exits the process by itself.
    stop.check()
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):
      if stop.requested:
        break
    assert stop.requested and stop.name == "SIGTERM"
    with pytest.raises(stop_lib.Abandoned):
      stop.check()
  assert signal.getsignal(signal.SIGTERM) == before  # The handlers are put back.
