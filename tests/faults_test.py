"""Fault and abuse battery: bad inputs, misuse of a workdir, and faults, as a careless user meets them.

Each case checks the exit code, that the message is one sentence (at most 3 lines besides progress, no
traceback), and that no finished checkpoint or metrics row is lost. Cheap cases run `main.main` in this
process; the faults that need a real process (a full disk, two writers, signals, a read-only workdir) are
marked slow. Tests jaxcollab/workdir.py, stop.py and the hooks in train.py, run.py, config.py, records.py, metrics.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import portpicker
import pytest

import checkpoint_runs as runs
from jaxcollab import checkpoint, errors, evaluate, main, metrics, records, train
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab import workdir as workdir_lib

SMOKE = [
  "--config.model.hidden=32",
  "--config.train.steps=10",
  "--config.checkpoint.every=5",
  "--config.train.eval_every=5",
  "--config.train.log_every=5",
  "--config.checkpoint.keep=10",
]


def _train(workdir, *flags, experiment="mlp_digits:smoke") -> int:
  return main.main(["train", "--config", experiment, "--workdir", str(workdir), *flags])


def _one_sentence(err: str, command: str = "train") -> str:
  """The error line; asserts at most 3 lines besides a started run's progress and INFO lines, no traceback."""
  assert "Traceback" not in err, err
  lines = [
    line
    for line in err.splitlines()
    if line.strip() and not line.startswith("step ") and not re.match(r"\d\d:\d\d:\d\d INFO ", line)
  ]
  assert len(lines) <= 3, err
  errors = [line for line in lines if line.startswith(f"jaxcollab {command}: error: ")]
  assert len(errors) == 1, err
  return errors[0]


def snapshot(path, ignore=(errors.LOG_FILE,)) -> dict[str, bytes]:
  """Every file under `path` with its bytes (a changed, added or removed file shows)."""
  out = {}
  for root, _, names in os.walk(str(path)):
    for name in names:
      if name not in ignore:
        file = os.path.join(root, name)
        with open(file, "rb") as f:
          out[os.path.relpath(file, str(path))] = f.read()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 10-step run: checkpoints 5 and 10, evals at 5 and 10."""
  path = str(tmp_path_factory.mktemp("faults") / "run")
  assert _train(path, *SMOKE) == 0
  return path


@pytest.fixture
def copy(trained, tmp_path):
  path = str(tmp_path / "run")
  shutil.copytree(trained, path)
  return path


def _steps(workdir) -> tuple[int, ...]:
  return checkpoint.finished_steps(runs.checkpoints(workdir))


# ---- Finding 4: values that are validated before anything is built --------------------------------

BAD_VALUES = [
  ("gpt_pydocs:smoke", "model.num_heads=0", "model.num_heads must be a positive integer, got 0"),
  ("gpt_pydocs:smoke", "model.mlp_dim=0", "model.mlp_dim must be a positive integer, got 0"),
  ("gpt_pydocs:smoke", "model.embed_dim=-8", "model.embed_dim must be a positive integer, got -8"),
  ("gpt_pydocs:smoke", "model.num_layers=0", "model.num_layers must be a positive integer"),
  ("gpt_pydocs:smoke", "model.context=0", "model.context must be a positive integer"),
  ("cnn_digits:smoke", "model.features=(32,1.5)", "'model.features' must be a tuple of int"),
  ("cnn_digits:smoke", "model.features=(32,'a')", "'model.features' must be a tuple of int"),
  ("cnn_digits:smoke", "model.features=(32,-4)", "model.features must be a non-empty tuple of positive ints"),
  ("mlp_digits:smoke", "seed=-1", "seed must be an integer in [0, 2**32), got -1"),
  ("mlp_digits:smoke", "seed=4294967296", "seed must be an integer in [0, 2**32), got 4294967296"),
  ("mlp_digits:smoke", "optimizer.b1=1.0", "optimizer.b1 and optimizer.b2 must be in [0, 1)"),
  ("mlp_digits:smoke", "optimizer.b2=-0.5", "optimizer.b1 and optimizer.b2 must be in [0, 1)"),
  ("mlp_digits:smoke", "dataset.num_workers=-2", "dataset.num_workers must be >= 0"),
  ("gpt_pydocs:smoke", "dataset.seq_len=0", "dataset.seq_len must be a positive integer"),
  ("mlp_digits:smoke", "mesh.rules=(('embed',),)", "mesh.rules entries must be pairs of strings"),
  ("mlp_digits:smoke", "train.target=perplexity < 3", "train.target names 'perplexity', which this run never"),
  ("gpt_pydocs:smoke", "train.target=accuracy >= 0.5", "train.target names 'accuracy', which this run never"),
  ("mlp_digits:smoke", "train.allow_changes=model.widht", "train.allow_changes names 'model.widht'"),
  # Finding 3: a model too large for the device, refused before anything is allocated.
  ("gpt_pydocs:smoke", "model.embed_dim=65536", "Out of device memory before initialisation: the model has "),
]


@pytest.mark.parametrize("experiment, override, needle", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_is_one_sentence_before_the_workdir_is_touched(tmp_path, capsys, experiment, override, needle):
  code = _train(tmp_path / "w", f"--config.{override}", experiment=experiment)
  line = _one_sentence(capsys.readouterr().err)
  assert code == 2 and needle in line, line
  assert not os.path.exists(tmp_path / "w")


def test_out_of_memory_names_model_size_batch_and_keys(tmp_path, capsys):
  code = _train(tmp_path / "w", "--config.model.embed_dim=65536", experiment="gpt_pydocs:smoke")
  line = _one_sentence(capsys.readouterr().err)
  assert code == 2
  for needle in ("34,396,700,800 parameters", "train.batch_size=8", "GiB; lower model.embed_dim", "mesh.fsdp"):
    assert needle in line, line


def test_out_of_memory_at_initialisation_is_one_sentence_not_a_hang(monkeypatch):
  """XLA's RESOURCE_EXHAUSTED surfaces when blocking on the whole state, and becomes a UserError."""
  run = run_lib.build(config_lib.load_experiment("mlp_digits:smoke"), devices=[train.jax.devices()[0]])

  def exhausted(tree):
    raise train.jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")

  monkeypatch.setattr(train.jax, "block_until_ready", exhausted)
  with pytest.raises(
    errors.UserError,
    match=r"Out of device memory while initialising the parameters: the model "
    r"has 76,810 parameters .* train.batch_size=32, and a device has [\d.]+ GiB; lower model.hidden",
  ):
    train.ready(run.init_state(), run, "while initialising the parameters")


def test_eval_batch_larger_than_the_split_is_clamped(caplog):
  config = config_lib.apply_overrides(
    config_lib.load_experiment("mlp_digits:smoke"), ["train.eval_batch_size=10000000"]
  )
  with caplog.at_level("INFO"):
    run = run_lib.build(config, devices=train.jax.devices()[:8])
  assert run.config.train.eval_batch_size == 360  # The 360 test digits, a multiple of the 8 devices.
  assert "train.eval_batch_size=10000000 exceeds the 360 examples of the eval split; using 360" in caplog.text


def _experiment(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text("from jaxcollab import config as config_lib\n\n" + body)
  return str(path)


@pytest.mark.parametrize(
  "body, argv_suffix, needle",
  [
    (
      "def get_config():\n  return config_lib.defaults()\n",
      ":smoke",
      "has no variants (its get_config() takes no argument); drop ':smoke'",
    ),
    ("def get_config(arg=None):\n  return 1 / 0\n", "", "failed (ZeroDivisionError: division by zero); fix the file"),
    ("def get_config(arg=None):\n  return {}\n", "", "returned dict; return an ml_collections.ConfigDict"),
  ],
  ids=["no-arg-with-variant", "raises", "not-a-configdict"],
)
def test_broken_experiment_file_is_one_sentence(tmp_path, capsys, body, argv_suffix, needle):
  code = _train(tmp_path / "w", experiment=_experiment(tmp_path, body) + argv_suffix)
  line = _one_sentence(capsys.readouterr().err)
  assert code == 2 and needle in line, line


def test_the_help_texts_file_name_with_variant_loads():
  config = config_lib.load_experiment("cnn_digits.py:smoke")  # What `train --help` suggests.
  assert config.model.name == "cnn" and config.train.steps < 100


# ---- Findings 5 and 6: paths that are not (or not only) a workdir ----------------------------------


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  assert _train(path) == 2
  assert "is a file, not a directory" in _one_sentence(capsys.readouterr().err)
  assert path.read_text() == "mine"


def test_workdir_under_a_file(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  assert _train(tmp_path / "notes.txt" / "run") == 2
  assert f"lies under {tmp_path / 'notes.txt'}, which is a file" in _one_sentence(capsys.readouterr().err)


def _foreign(path) -> None:
  os.makedirs(path / "tensorboard")
  (path / "config.json").write_text('{"theirs": 1}')
  (path / "metrics.jsonl").write_text('{"their": "row"}\n')
  (path / "report.json").write_text("{}")
  (path / "tensorboard" / "events.out.tfevents.1.other").write_bytes(b"\x00\x01")


def test_non_empty_foreign_directory_is_refused_untouched(tmp_path, capsys):
  _foreign(tmp_path / "other")
  before = snapshot(tmp_path / "other")
  assert _train(tmp_path / "other") == 2
  line = _one_sentence(capsys.readouterr().err)
  assert "is not empty (config.json, metrics.jsonl, report.json and 1 more) and is not a jaxcollab workdir" in line
  assert "--use_nonempty_workdir" in line
  assert snapshot(tmp_path / "other", ignore=()) == before


def test_busy_workdir_is_refused_and_nothing_is_touched(copy, capsys):
  holder = workdir_lib.Lock(copy)
  holder.acquire()  # Another open file description: flock conflicts even within one process.
  try:
    before = snapshot(copy, ignore=())
    assert _train(copy, *SMOKE) == 2
    line = _one_sentence(capsys.readouterr().err)
    assert f"Workdir {copy} is in use by pid {os.getpid()} on host " in line and "another --workdir" in line
    assert snapshot(copy, ignore=()) == before
  finally:
    holder.release()


def test_malformed_metrics_line_train_names_it_and_inspect_skips_it(copy, capsys, caplog):
  path = os.path.join(copy, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  lines[1] = '{"step": 5, "split": "eval", "loss": 0.3\n'  # Torn in the middle of the file.
  with open(path, "w") as f:
    f.writelines(lines)
  before = snapshot(copy)
  assert _train(copy, *SMOKE, "--config.train.steps=15") == 2
  line = _one_sentence(capsys.readouterr().err)
  assert f"Line 2 of {path} is not a JSON object" in line and "fix or delete that line" in line
  assert snapshot(copy) == before
  with caplog.at_level("WARNING"):
    assert main.main(["inspect", copy]) == 0
  assert f"Skipping line 2 of {path}" in caplog.text


@pytest.mark.parametrize(
  "flags, needle",
  [
    (["--config.model.activation=gelu"], 'model.activation "relu" -> "gelu"'),
    (
      ["--config.seed=7", "--config.optimizer.learning_rate=0.01"],
      "optimizer.learning_rate 0.001 -> 0.01, seed 0 -> 7",
    ),
    (["--config.loss.name=mse"], 'loss.name "cross_entropy" -> "mse"'),
    (["--config.dataset.augment=true"], "dataset.augment False -> True"),
    (["--config.optimizer.schedule=warmup_cosine"], 'optimizer.schedule "constant" -> "warmup_cosine"'),
    (["--config.model.hidden=64"], "model.hidden 32 -> 64"),  # Named by key, not only by its shapes.
  ],
  ids=["activation", "seed-and-lr", "loss", "augment", "schedule", "width"],
)
def test_resume_with_a_changed_computation_is_refused(copy, capsys, flags, needle):
  """Finding 1: the checkpoint's own config is compared; finished steps and rows stay."""
  before = snapshot(copy)
  assert _train(copy, *SMOKE, "--config.train.steps=15", *flags) == 2
  line = _one_sentence(capsys.readouterr().err)
  assert f"Resuming {copy} from step 10 would change how its checkpoints were computed ({needle})" in line, line
  assert "--config.train.allow_changes=" in line
  assert snapshot(copy) == before
  with open(os.path.join(copy, errors.LOG_FILE)) as f:
    assert "Traceback" in f.read()  # The detail is in the log, not on the terminal.


def test_allowed_and_deliberate_changes_resume_and_are_recorded(copy, caplog):
  flags = [
    *SMOKE,
    "--config.train.steps=15",
    "--config.model.activation=gelu",
    "--config.train.allow_changes=model.activation",
  ]
  with caplog.at_level("INFO"):
    assert _train(copy, *flags) == 0
  assert "Resuming from step 10 " in caplog.text
  assert _steps(copy) == (5, 10, 15)
  segments = workdir_lib.read_run_info(copy)["segments"]
  assert [(s["start_step"], s["end_step"], s["status"]) for s in segments] == [
    (0, 10, "finished"),
    (10, 15, "finished"),
  ]
  assert segments[1]["config_changes"] == {
    "model.activation": ["relu", "gelu"],
    "train.allow_changes": ["", "model.activation"],
    "train.steps": [10, 15],
  }
  assert "--config.train.steps=15" in segments[1]["command"] or segments[1]["command"]
  with open(os.path.join(copy, "config.json")) as f:
    assert json.load(f)["model"]["activation"] == "gelu"  # config.json: what trained the newest segment.


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(copy, caplog):
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
  )
  with open(os.path.join(copy, workdir_lib.LOCK_FILE), "w") as f:
    json.dump({"host": "elsewhere", "pid": int(dead.stdout), "since": "2026-01-01T00:00:00+00:00"}, f)
  with caplog.at_level("WARNING"):
    assert _train(copy, *SMOKE) == 0  # Finished: nothing to train, evaluates again.
  assert f"left by pid {int(dead.stdout)} on host elsewhere" in caplog.text and "no longer running" in caplog.text
  with open(os.path.join(copy, workdir_lib.LOCK_FILE)) as f:
    assert f.read() == ""  # Released at exit.


def test_rerunning_a_finished_run_keeps_config_json(copy):
  path = os.path.join(copy, "config.json")
  mtime = os.stat(path).st_mtime_ns
  assert _train(copy, *SMOKE) == 0
  assert os.stat(path).st_mtime_ns == mtime


# ---- Finding 7: signals during evaluation -------------------------------------------------------


def test_sigterm_during_evaluation_abandons_it_and_saves_the_step(tmp_path, monkeypatch, capsys, caplog):
  original = evaluate.Evaluator.evaluate

  def evaluate_then_signal(self, state):
    os.kill(os.getpid(), signal.SIGTERM)  # Arrives while the evaluation runs.
    time.sleep(0.05)
    return original(self, state)

  monkeypatch.setattr(evaluate.Evaluator, "evaluate", evaluate_then_signal)
  workdir = tmp_path / "run"
  with caplog.at_level("INFO"):
    assert _train(workdir, *SMOKE) == 0
  assert "Evaluation abandoned: SIGTERM arrived." in caplog.text
  assert "Stopped by SIGTERM at step 5: checkpoint saved in" in caplog.text
  assert _steps(workdir) == (5,)
  assert [r["split"] for r in records.read_metrics(str(workdir))] == ["train"]  # No eval row for step 5.
  assert workdir_lib.read_run_info(str(workdir))["segments"][-1]["status"] == "stopped"


# ---- Finding 8: what the terminal shows ----------------------------------------------


def test_progress_on_a_terminal_reporting_0_columns_prints_lines(monkeypatch, capsys):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((0, 0)))
  progress = metrics.Progress(10, every=5)
  progress.update(5, {"loss": 1.0})
  progress.close()
  assert "step 5/10 (50%) loss 1.0000" in capsys.readouterr().err


# ---- Real processes: a full disk, two writers, a signal in setup, a read-only workdir ---------------


def _train_argv(workdir, *flags, prefix=()) -> list[str]:
  """`jaxcollab train` of mlp_digits:smoke into `workdir`, after a `prefix` command (ulimit, setpriv)."""
  return [*prefix, *runs.train_command("mlp_digits.py:smoke", workdir), *flags]


def _process_train(workdir, *flags, prefix=(), timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(
    _train_argv(workdir, *flags, prefix=prefix),
    env=runs.env(1),
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=runs.REPO,
    check=False,
  )


@pytest.mark.slow
def test_full_disk_is_one_sentence_and_finished_steps_stay(copy):
  rows = records.read_metrics(copy)
  # Files over 16 KiB cannot grow, as on a full disk (EFBIG instead of ENOSPC); set by the shell, not by a fork.
  out = _process_train(copy, *SMOKE, "--config.train.steps=20", prefix=("bash", "-c", 'ulimit -f 16 && exec "$@"', "-"))
  assert out.returncode == 2, out.stderr
  line = _one_sentence(out.stderr)  # (Which write hits the limit first varies: a checkpoint, a plot.)
  assert ": a file size limit was reached; free disk space" in line, line
  assert f"(details in {os.path.join(copy, errors.LOG_FILE)})" in line
  with open(os.path.join(copy, errors.LOG_FILE)) as f:
    assert "File too large" in f.read()
  assert {5, 10} <= set(_steps(copy))  # Nothing finished was lost; nothing half-written is visible.
  for step in _steps(copy):
    checkpoint.verify(os.path.join(runs.checkpoints(copy), str(step)), step)
  assert records.read_metrics(copy)[: len(rows)] == rows
  assert workdir_lib.read_run_info(copy)["segments"][-1]["status"] == "failed"


@pytest.mark.slow
def test_two_writers_one_is_refused_and_the_workdir_stays_whole(tmp_path):
  workdir = tmp_path / "run"
  flags = ["--config.train.steps=100000", "--config.checkpoint.every=50"]
  first = subprocess.Popen(
    _train_argv(workdir, *flags),
    env=runs.env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    cwd=runs.REPO,
  )
  try:
    deadline = time.time() + 120
    while not os.path.exists(workdir / workdir_lib.LOCK_FILE) and time.time() < deadline:
      time.sleep(0.05)
    before = snapshot(workdir / "checkpoints")
    second = _process_train(workdir, *flags)
    assert second.returncode == 2, second.stderr
    assert f"Workdir {workdir} is in use by pid {first.pid}" in _one_sentence(second.stderr)
    assert first.poll() is None  # The first writer never noticed.
    assert set(before) <= set(snapshot(workdir / "checkpoints")) or not before
    # Past its setup (a signal there exits at once, with nothing to save): a train row is written.
    rows = workdir / records.METRICS_FILE
    while not (rows.exists() and rows.stat().st_size) and time.time() < deadline and first.poll() is None:
      time.sleep(0.05)
  finally:
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=120)
  assert first.returncode == 0 and "Stopped by SIGTERM at step " in first_err, first_err[-3000:]
  records.read_metrics(str(workdir))  # Every line whole (a torn line in the middle would raise).
  assert _steps(workdir)
  for step in _steps(workdir):
    checkpoint.verify(os.path.join(runs.checkpoints(workdir), str(step)), step)


@pytest.mark.slow
def test_sigterm_during_setup_exits_at_once(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-m", "jaxcollab.main", "train", "--config", "gpt_pydocs:smoke", "--workdir", str(workdir)],
    env=runs.env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    cwd=runs.REPO,
  )
  deadline = time.time() + 120
  while not os.path.exists(workdir / workdir_lib.LOCK_FILE) and time.time() < deadline:
    time.sleep(0.02)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert time.time() - sent < 10, err  # The documented bound, with margin for a loaded machine.
  assert proc.returncode == 0, err
  assert "Stopped by SIGTERM during setup (" in err and "Traceback" not in err
  with open(workdir / workdir_lib.LOCK_FILE) as f:
    assert f.read() == ""  # The lock was released before exiting.


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as nobody")
def test_read_only_workdir_is_one_sentence(trained):
  """A workdir this user cannot write to (also a finished one): refused before anything is written."""
  parent = tempfile.mkdtemp(prefix="jaxcollab-ro-")  # Under /tmp: traversable by nobody, unlike pytest's tmp.
  os.chmod(parent, 0o755)
  copy = os.path.join(parent, "run")
  shutil.copytree(trained, copy)
  before = snapshot(copy, ignore=())
  env = {**runs.env(1), "JAXCOLLAB_CACHE": "", "HOME": "/tmp", "PYTHONPATH": runs.REPO}
  argv = _train_argv(copy, *SMOKE, prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
  out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd="/tmp", check=False)
  assert out.returncode == 2, out.stderr
  line = _one_sentence(out.stderr)
  assert f"Cannot write to workdir {copy} (permission denied)" in line
  assert snapshot(copy, ignore=()) == before
  shutil.rmtree(parent)


def test_os_cause_reads_wrapped_errors():
  assert errors.os_cause(OSError(28, "No space left on device")) == "the disk is full"
  assert errors.os_cause(ValueError("OUT_OF_RANGE: Failed to write [os_error_code='27']")) == (
    "a file size limit was reached"
  )
  assert errors.os_cause(ValueError("something else")) == "something else"


@pytest.mark.slow
def test_busy_workdir_stops_every_process_of_a_multi_process_run(tmp_path):
  """Process 0 is refused the lock; process 1 must learn it and exit too, not wait on collectives."""
  import multihost_test as multihost  # pylint: disable=g-import-not-at-top  # Its launch helpers.

  workdir = tmp_path / "run"
  os.makedirs(workdir)
  holder = workdir_lib.Lock(str(workdir))
  holder.acquire()
  try:
    port = portpicker.pick_unused_port()
    logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
    procs = [multihost.start(multihost.train_args(workdir, port, i), 4, logs[i]) for i in range(2)]
    assert multihost.finish(procs, logs, timeout=180) == [2, 2], [open(log).read()[-2000:] for log in logs]
  finally:
    holder.release()
  first, second = (open(log).read() for log in logs)
  assert f"Workdir {workdir} is in use by pid {os.getpid()}" in first
  assert f"Process(es) [0] could not use --workdir {workdir}" in second
  assert "Traceback" not in first + second
