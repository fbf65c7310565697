"""The CLI: every user error is one sentence on stderr and exit code 2, with no traceback."""

import gc
import os
import subprocess
import sys

import pytest

from jaxcollab import main


@pytest.mark.parametrize(
  "extra, needle",
  [
    (["--config.optimizer.learnin_rate=0.1"], "did you mean 'optimizer.learning_rate'"),
    (["--config.train.steps=abc"], "'train.steps' must be int"),
    (["--config.optimizer.learning_rate=-1"], "optimizer.learning_rate must be a positive number"),
    (["--config.train.batch_size=0"], "train.batch_size must be a positive integer"),
    (["--config.model.activation=swishy"], "Unknown model.activation 'swishy'"),
    (["--config.loss.name=hinge"], "Unknown loss.name 'hinge'"),
    (["--config.optimizer.name=lamb"], "Unknown optimizer.name 'lamb'"),
    (["--config.dataset.name=mnistt"], "did you mean 'mnist'"),
    (["--config.model.name=resnet", "--config.train.batch_size=7"], "not divisible by mesh data"),
  ],
)
def test_bad_config_exits_2(tmp_path, capsys, extra, needle):
  code = main.main(["train", "--config", "mlp_digits:smoke", "--workdir", str(tmp_path / "w"), *extra])
  err = capsys.readouterr().err
  assert code == 2
  assert needle in err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert not os.path.exists(tmp_path / "w" / "checkpoints")  # Failed before anything ran.
  assert gc.isenabled()  # The start-up's pause ends with the error too.


def test_bad_experiment_files_exit_2(tmp_path, capsys):
  assert main.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)]) == 2
  assert "does not exist" in capsys.readouterr().err
  no_fn = tmp_path / "no_fn.py"
  no_fn.write_text("CONFIG = {}\n")
  assert main.main(["train", "--config", str(no_fn), "--workdir", str(tmp_path)]) == 2
  assert "has no get_config()" in capsys.readouterr().err


def test_unknown_flag_is_an_argparse_error(tmp_path):
  with pytest.raises(SystemExit) as e:
    main.main(["train", "--config", "mlp_digits:smoke", "--workdir", str(tmp_path), "--stepz=3"])
  assert e.value.code == 2


def test_help_for_every_subcommand(capsys):
  for command in ("train", "eval", "inspect", "sample", "predict", "export"):
    with pytest.raises(SystemExit) as e:
      main.main([command, "--help"])
    assert e.value.code == 0
    assert "usage: jaxcollab " + command in capsys.readouterr().out


def test_real_process_prints_one_sentence(tmp_path):
  """The installed console script, as a user runs it: exit 2 and a single line, no traceback."""
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxcollab.main",
      "train",
      "--config",
      "experiments/mlp_digits.py",
      "--workdir",
      str(tmp_path),
      "--config.train.stpes=10",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.join(os.path.dirname(__file__), ".."),
  )
  assert out.returncode == 2, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines == [
    "jaxcollab train: error: Unknown config key 'train.stpes' on the command line; did you mean 'train.steps'?"
  ], out.stderr


def test_train_pauses_the_collector_for_its_start_up_only(tmp_path, monkeypatch):
  from jaxcollab import train  # pylint: disable=g-import-not-at-top

  seen = {}

  def spy(name, fn):
    def wrapped(*args, **kwargs):
      seen.setdefault(name, gc.isenabled())
      return fn(*args, **kwargs)

    monkeypatch.setattr(train, name, wrapped)

  spy("compile_ahead", train.compile_ahead)  # Start-up: tracing and compiling.
  spy("_evaluate", train._evaluate)  # After the first step.
  assert main.main(["train", "--config", "mlp_digits:smoke", "--workdir", str(tmp_path / "w")]) == 0
  assert seen == {"compile_ahead": False, "_evaluate": True}
  assert gc.isenabled()
