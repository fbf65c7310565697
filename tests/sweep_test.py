"""Sweeps: grid parsing and names, bad inputs before training, and a kill-and-restart that runs only what is missing."""

import json
import os
import signal

import pytest

from jaxcollab import config as config_lib
from jaxcollab import main, records, seeds, sweep
from jaxcollab.errors import UserError


def test_values_split_at_top_level_commas_only():
  assert sweep.split_values("relu,gelu") == ["relu", "gelu"]
  assert sweep.split_values("(32,64),(16, 16, 8)") == ["(32,64)", "(16, 16, 8)"]
  assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]


@pytest.mark.parametrize(
  "text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("3", [3]), ("0,2,7", [0, 2, 7]), ("0-2,9", [0, 1, 2, 9])]
)
def test_seeds_parse(text, seeds):
  assert sweep.parse_seeds(text) == seeds


def test_grid_is_the_cartesian_product_with_readable_names():
  config = config_lib.load_experiment("ablate_digits", "smoke")
  grid = sweep.parse_grid(
    ["model.activation=relu,tanh,sigmoid", "loss.name=cross_entropy,mse", "model.features=(8,16),(4,)"]
  )
  cells = sweep.expand(config, grid, ["model.name=cnn"])
  assert len(cells) == 3 * 2 * 2
  names = [c.name for c in cells]
  assert names[0] == "activation=relu,loss=cross_entropy,features=8x16"
  assert len(set(names)) == len(names)
  for c in cells:  # Each cell's config holds exactly its values, parsed like --config overrides.
    assert (c.config.model.activation, c.config.loss.name, tuple(c.config.model.features)) == tuple(c.values.values())
  assert cells[-1].config.model.features == (4,)
  # Dotted keys whose last parts clash keep their whole name.
  assert sweep.compare.group_name({"a.x": 1, "b.x": 2.5}) == "a.x=1,b.x=2.5"


def test_declared_grid_and_seeds_come_from_get_sweep(tmp_path):
  p = sweep.plan("ablate_digits:smoke", str(tmp_path), [], None, [])
  assert p.seeds == [0, 1] and p.total == 2 * 2 * 2
  assert p.workdir(p.cells[0], 1) == os.path.join(str(tmp_path), "activation=relu,loss=cross_entropy", "seed_1")
  assert p.config(p.cells[0], 1).seed == 1
  # The command line replaces a declared key's values.
  p = sweep.plan("ablate_digits:smoke", str(tmp_path), ["model.activation=silu"], "4-5", [])
  assert [c.name for c in p.cells] == ["activation=silu,loss=cross_entropy", "activation=silu,loss=mse"]
  assert p.seeds == [4, 5]


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--grid", "optimizer.learnin_rate=0.1"], "did you mean 'optimizer.learning_rate'"),
    (["--grid", "model.activaton=relu"], "does not read model.activaton; its keys are model.name, model.activation"),
    (["--grid", "train.steps=10,abc"], "'train.steps' must be int"),
    (["--grid", "model.activation="], "has an empty value"),
    (["--grid", "model.activation=relu,,gelu"], "has an empty value"),
    (["--grid", "model.activation=relu", "--grid", "model.activation=gelu"], "is given twice"),
    (["--grid", "model.activation=relu", "--config.model.activation=gelu"], "both a grid key and a --config"),
    (["--grid", "model.activation=relu,swishy"], "Unknown model.activation 'swishy'"),
    (["--seeds", "0-"], "--seeds '0-' does not parse"),
    (["--seeds", "4-1"], "does not parse"),
    (["--seeds", "1,1"], "names a seed twice"),
  ],
)
def test_bad_inputs_exit_2_before_training(tmp_path, capsys, args, needle):
  code = main.main(["sweep", "--config", "ablate_digits:smoke", "--workdir", str(tmp_path / "s"), *args])
  err = capsys.readouterr().err
  assert code == 2, err
  assert needle in err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert not os.path.exists(tmp_path / "s")  # Nothing ran, nothing was written.


def test_help(capsys):
  for command in ("sweep", "compare", "cka"):
    with pytest.raises(SystemExit) as e:
      main.main([command, "--help"])
    assert e.value.code == 0
  assert "--baseline" in capsys.readouterr().out


def _rows(workdir):
  return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in records.read_metrics(workdir)]


@pytest.mark.slow
def test_killed_sweep_restarts_only_what_is_missing(tmp_path, monkeypatch):
  grid = ["model.activation=relu,tanh", "loss.name=cross_entropy"]
  assert sweep.sweep("ablate_digits:smoke", str(tmp_path / "whole"), grid) == 0

  # Interrupt the second cell at step 6 (a checkpoint step) with SIGTERM, as a scheduler would.
  calls = []
  original = seeds.train_seeds

  def interrupted(configs, workdirs, on_step=None):
    calls.append(workdirs)
    stop = (lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 6 else None) if len(calls) == 2 else None
    return original(configs, workdirs, on_step=stop)

  monkeypatch.setattr(sweep.seeds_lib, "train_seeds", interrupted)
  target = tmp_path / "resumed"
  assert sweep.sweep("ablate_digits:smoke", str(target), grid) == 1  # Stopped: not all runs finished.
  first, second = [os.path.dirname(w[0]) for w in calls]
  assert all(sweep.finished(os.path.join(first, f"seed_{s}")) for s in (0, 1))
  assert not any(sweep.finished(os.path.join(second, f"seed_{s}")) for s in (0, 1))
  finished_before = os.path.getmtime(os.path.join(first, "seed_0", "metrics.jsonl"))

  calls.clear()
  assert sweep.sweep("ablate_digits:smoke", str(target), grid) == 0
  assert [os.path.dirname(w[0]) for w in calls] == [second]  # Only the interrupted cell ran again.
  assert os.path.getmtime(os.path.join(first, "seed_0", "metrics.jsonl")) == finished_before
  for cell in os.listdir(tmp_path / "whole"):
    for s in (0, 1):
      if cell.startswith("activation"):
        assert _rows(target / cell / f"seed_{s}") == _rows(tmp_path / "whole" / cell / f"seed_{s}")
  record = json.loads((target / "sweep.json").read_text())
  assert record["grid"] == {"model.activation": ["relu", "tanh"], "loss.name": ["cross_entropy"]}
  assert {r["status"] for r in record["runs"].values()} == {"done"} and len(record["runs"]) == 4


def test_failing_run_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
  # A learning rate this large makes the loss NaN: that cell fails, the other still trains.
  # Its two seeds diverge together in the vmapped program, then again one at a time.
  code = sweep.sweep(
    "mlp_digits:smoke", str(tmp_path), ["optimizer.learning_rate=1e30,0.001", "model.activation=relu"], "0-1", []
  )
  err = capsys.readouterr().err
  assert code == 1
  for s in (0, 1):
    assert f"FAILED learning_rate=1e+30,activation=relu/seed_{s}: NonFiniteLossError" in err
    assert sweep.finished(str(tmp_path / "learning_rate=0.001,activation=relu" / f"seed_{s}"))
  assert "2 failed" in err


def test_resnet_falls_back_to_one_seed_at_a_time():
  config = config_lib.load_experiment("ablate_digits", "smoke")
  assert "BatchNorm" in seeds.why_not_vmapped(config_lib.apply_overrides(config, ["model.name=resnet"]))
  assert seeds.why_not_vmapped(config) is None


def test_changed_config_in_an_existing_sweep_is_a_user_error(tmp_path):
  workdir = tmp_path / "activation=relu" / "seed_0"
  workdir.mkdir(parents=True)
  config = config_lib.apply_overrides(
    config_lib.load_experiment("mlp_digits", "smoke"), ["optimizer.learning_rate=0.5"]
  )
  (workdir / "config.json").write_text(config_lib.to_json(config_lib.validate(config)))
  with pytest.raises(UserError, match=r"would change how its checkpoints were computed \(optimizer.learning_rate 0.5"):
    sweep.plan("mlp_digits:smoke", str(tmp_path), ["model.activation=relu"], "0", [])
