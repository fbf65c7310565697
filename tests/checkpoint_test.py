"""jaxcollab/checkpoint.py: layout, load, inspect, eval, strict structure, init_from, damage, errors.

Runs in this process (8 simulated devices) except where a fresh process is the point: the README's
plain-orbax recipe and one real `jaxcollab` process for a bad input.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoint_runs as runs
import jaxcollab
from jaxcollab import checkpoint, main, models, reload
from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab.errors import CheckpointError

SMOKE = os.path.join(runs.REPO, "experiments", "mlp_digits.py:smoke")
FLAGS = ("--config.checkpoint.every=5", "--config.checkpoint.keep=10")  # Steps 5, 10, 15, 20; evals at 10, 20.


def _train(workdir, *flags, experiment=SMOKE) -> int:
  return main.main(["train", "--config", experiment, "--workdir", str(workdir), *FLAGS, *flags])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished mlp smoke run trained in this process on 8 devices; tests copy it before changing it."""
  path = tmp_path_factory.mktemp("mlp") / "run"
  assert _train(path) == 0
  return str(path)


@pytest.fixture
def copy(workdir, tmp_path):
  path = tmp_path / "copy"
  shutil.copytree(workdir, path)
  return str(path)


def _error_line(capsys, command: str) -> str:
  """The one error sentence, last on stderr (progress lines may precede it)."""
  err = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in err if line.startswith(f"jaxcollab {command}: error: ")]
  assert len(errors) == 1 and err[-1] == errors[0], err
  return errors[0]


def test_step_directory_holds_state_data_config_meta(workdir):
  assert checkpoint.finished_steps(runs.checkpoints(workdir)) == (5, 10, 15, 20)
  step = os.path.join(runs.checkpoints(workdir), "10")
  assert {"state", "data", "config", "meta", checkpoint.CHECKSUMS} <= set(os.listdir(step))
  state = runs.read_state(workdir, 10)
  assert set(state) == {"step", "params", "opt_state", "rng"} and int(state["step"]) == 10
  assert state["rng"].dtype == np.uint32 and state["params"]["hidden"]["kernel"].shape == (64, 1024)
  with open(os.path.join(workdir, "config.json")) as f:
    assert runs.step_files(workdir, 10, "config")["metadata"] == json.dumps(json.load(f))
  assert json.loads(runs.step_files(workdir, 10, "data")["process_0-of-1.json"]) == {"next_index": 10}
  meta = json.loads(runs.step_files(workdir, 10, "meta")["metadata"])
  rows = [r for r in runs.rows(workdir) if r["split"] == "eval" and r["step"] == 10]
  assert meta["step"] == 10 and [{"step": 10, "split": "eval", **meta["eval"]}] == rows
  assert meta["devices"] == 8 and meta["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert meta["versions"]["jax"] == jax.__version__ and meta["versions"]["orbax-checkpoint"] == ocp.__version__
  meta5 = json.loads(runs.step_files(workdir, 5, "meta")["metadata"])
  assert meta5["eval"] == {} and meta5["last_eval"] is None  # No evaluation before step 10.
  meta15 = json.loads(runs.step_files(workdir, 15, "meta")["metadata"])
  assert meta15["eval"] == {} and meta15["last_eval"] == {"step": 10, "metrics": meta["eval"]}


def test_load_from_workdir_step_or_step_directory(workdir):
  model, variables, config = jaxcollab.load(workdir)
  assert config.model.name == "mlp" and set(variables) == {"params"}
  runs.assert_same_arrays(jax.device_get(variables), {"params": runs.read_state(workdir, 20)["params"]})
  _, at_10, _ = jaxcollab.load(workdir, step=10)
  _, also_10, _ = jaxcollab.load(os.path.join(runs.checkpoints(workdir), "10"))
  runs.assert_same_arrays(jax.device_get(at_10), jax.device_get(also_10))
  assert all(x.devices() == {jax.devices()[0]} for x in jax.tree.leaves(variables))  # Default device.
  logits = model.apply(variables, np.zeros((2, 8, 8, 1), np.float32), train=False)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()


def test_inspect_text_and_json(workdir, capsys):
  assert main.main(["inspect", workdir]) == 0
  text = capsys.readouterr().out
  assert "steps 5, 10, 15, 20; showing step 20" in text and "model mlp on digits" in text
  assert re.search(r"params/hidden/kernel\s+\(64, 1024\)\s+float32\s+65,536\s+262,144 B", text)
  assert "76,810 parameters" in text and f"jax {jax.__version__}" in text and "files: complete" in text
  assert main.main(["inspect", os.path.join(runs.checkpoints(workdir), "10"), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["step"] == 10 and info["steps"] == [5, 10, 15, 20] and info["param_count"] == 76810
  assert info["integrity"].startswith("complete")
  arrays = {a["path"]: a for a in info["arrays"]}
  assert arrays["params/hidden/kernel"] == {
    "path": "params/hidden/kernel",
    "shape": [64, 1024],
    "dtype": "float32",
    "count": 65536,
    "bytes": 262144,
  }
  assert "opt_state/0/mu/hidden/kernel" in arrays and arrays["step"]["dtype"] == "int32"
  assert info["totals"]["opt_state"]["count"] == 2 * 76810 + 2  # Adam's mu and nu, plus two counters.
  assert info["config"]["model"]["hidden"] == 1024 and info["meta"]["step"] == 10
  assert {r["split"] for r in info["metrics"]["at_step"]} == {"train", "eval"}


def test_eval_a_chosen_step(workdir, capsys):
  assert main.main(["eval", "--workdir", workdir, "--step", "10"]) == 0
  result = json.loads(capsys.readouterr().out)
  saved = json.loads(runs.step_files(workdir, 10, "meta")["metadata"])["eval"]
  assert result["accuracy"] == saved["accuracy"] and result["loss"] == pytest.approx(saved["loss"], rel=1e-6)


@pytest.mark.parametrize(
  "argv, needle",
  [
    (["inspect", "{tmp}/nowhere"], "does not exist"),
    (["inspect", "{tmp}"], "holds no finished checkpoint"),
    (["eval", "--workdir", "{tmp}/empty_step/7"], "holds no finished checkpoint"),
    (["eval", "--workdir", "{run}", "--step", "7"], "Step 7 is not among the checkpoints in"),
    (["inspect", "{run}/checkpoints/10", "--step", "15"], "is step 10, not step 15"),
  ],
  ids=["missing-path", "not-a-checkpoint", "empty-step-dir", "missing-step", "step-dir-and-step"],
)
def test_bad_paths_exit_2_with_one_sentence(workdir, tmp_path, capsys, argv, needle):
  os.makedirs(tmp_path / "empty_step" / "7")
  argv = [a.format(tmp=tmp_path, run=workdir) for a in argv]
  assert main.main(argv) == 2
  assert needle in _error_line(capsys, argv[0])


@pytest.mark.parametrize(
  "flag, needles",
  [
    (
      "--config.model.hidden=512",
      [
        "shape mismatch: params/head/kernel saved (1024, 10) vs model (512, 10)",
        "params/hidden/kernel saved (64, 1024) vs model (64, 512)",
      ],
    ),
    (
      "--config.model.name=cnn",
      ["missing: params/conv_0/bias", "params/conv_0/kernel", "unexpected: params/hidden/bias"],
    ),
    ("--config.optimizer.name=sgd", ["missing: opt_state/0/trace/head/bias", "unexpected: opt_state/0/count"]),
  ],
  ids=["width", "another-model", "another-optimizer"],
)
def test_resuming_into_another_structure_fails_and_keeps_the_steps(copy, capsys, flag, needles):
  # The config check on resume refuses these first (tests/faults_test.py); allowed, the shapes still must fit.
  assert _train(copy, flag, "--config.train.allow_changes=model.*,optimizer.*") == 2
  line = _error_line(capsys, "train")
  assert "does not fit this model and optimizer" in line and "--config.init_from" in line
  for needle in needles:
    assert needle in line
  assert checkpoint.finished_steps(runs.checkpoints(copy)) == (5, 10, 15, 20)


def _params(config: config_lib.ConfigDict):
  from jaxcollab import data  # pylint: disable=g-import-not-at-top

  info = data.get_dataset(config).info
  return nn.unbox(run_lib.init_variables(models.build(config, info), info, 0))["params"]


@pytest.mark.parametrize(
  "change, missing, unexpected, mismatched",
  [
    (
      ("model.hidden=16",),
      [],
      [],
      ["params/head/kernel saved (1024, 10) vs model (16, 10)", "params/hidden/bias saved (1024,) vs model (16,)"],
    ),
    (("model.name=cnn", "model.features=(4,)"), ["params/conv_0/bias"], ["params/hidden/bias"], []),
  ],
  ids=["width", "depth"],
)
def test_structure_check_names_every_path(change, missing, unexpected, mismatched):
  base = config_lib.load_experiment(SMOKE)
  saved = jax.eval_shape(lambda: {"params": _params(base)})
  expected = jax.eval_shape(lambda: {"params": _params(config_lib.apply_overrides(base, list(change)))})
  with pytest.raises(CheckpointError) as e:
    checkpoint.check_structure(saved, expected, "STEP")
  for path in missing + unexpected + mismatched:
    assert path in str(e.value)
  got = checkpoint.structure_diff(saved, expected)
  assert set(missing) <= set(got[0]) and set(unexpected) <= set(got[1]) and set(mismatched) <= set(got[2])


def test_structure_check_names_a_renamed_layer():
  saved = {"params": {"hidden": {"kernel": np.zeros((3, 4))}, "head": {"kernel": np.zeros((4, 2))}}}
  renamed = {"params": {"hidden": {"kernel": np.zeros((3, 4))}, "out": {"kernel": np.zeros((4, 2))}}}
  with pytest.raises(CheckpointError, match=r"missing: params/out/kernel; unexpected: params/head/kernel"):
    checkpoint.check_structure(saved, renamed, "STEP")
  checkpoint.check_structure(saved, saved, "STEP")  # Same structure: no error.


def test_init_from_loads_matching_parameters_and_reports_the_rest(workdir, caplog):
  source = runs.read_state(workdir)["params"]
  config = config_lib.apply_overrides(config_lib.load_experiment(SMOKE), ["model.hidden=512"])
  run = run_lib.build(config)
  fresh = run.init_state()
  with caplog.at_level(logging.INFO):
    state = reload.init_from(fresh, workdir)
  message = caplog.text
  assert "loaded 1 of 4 arrays; kept the fresh initialisation of 3" in message
  assert "params/hidden/kernel" in message and "params/head/kernel" in message
  params = jax.device_get(state.params)
  assert np.array_equal(params["head"]["bias"], source["head"]["bias"])  # Same path and shape: loaded.
  assert np.array_equal(params["hidden"]["kernel"], jax.device_get(fresh.params["hidden"]["kernel"]))
  assert state.params["head"]["bias"].sharding == fresh.params["head"]["bias"].sharding


def test_init_from_a_run_starts_from_its_parameters(workdir, tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    assert _train(tmp_path / "tuned", f"--config.init_from={workdir}", "--config.train.steps=5") == 0
  assert "loaded 4 of 4 arrays; kept the fresh initialisation of 0" in caplog.text
  step5 = runs.read_state(tmp_path / "tuned")
  assert int(step5["step"]) == 5 and int(step5["opt_state"][0]["count"]) == 5  # Optimizer and step start fresh.


def _corrupt(step_dir: str, kind: str) -> str:
  """Damages one file of a step the way disks and people do; returns its path relative to the step."""
  data = os.path.join("state", "ocdbt.process_0", "d")
  biggest = max(
    os.listdir(os.path.join(step_dir, data)), key=lambda f: os.path.getsize(os.path.join(step_dir, data, f))
  )
  rel = {"meta": os.path.join("meta", "metadata"), "iterator": os.path.join("data", "process_0-of-1.json")}.get(
    kind, os.path.join(data, biggest)
  )
  path = os.path.join(step_dir, rel)
  size = os.path.getsize(path)
  if kind == "truncate":
    os.truncate(path, size // 2)
  elif kind == "delete":
    os.remove(path)
  else:  # Same size, other bytes: only the checksums notice.
    with open(path, "r+b") as f:
      f.seek(size // 2)
      f.write(bytes(255 - b for b in f.read(8)))
  return rel


@pytest.mark.parametrize("kind", ["garbage", "truncate", "delete", "meta", "iterator"])
def test_damaged_step_names_step_and_file(copy, capsys, kind):
  rel = _corrupt(os.path.join(runs.checkpoints(copy), "20"), kind)
  assert _train(copy) == 2
  line = _error_line(capsys, "train")
  assert f"Checkpoint step 20 in {runs.checkpoints(copy)} is damaged: file {os.path.join('20', rel)} " in line
  assert "--config.checkpoint.fallback=true to resume from step 15." in line
  assert main.main(["eval", "--workdir", copy]) == 2  # Reading it for use checks it too.
  assert f"file {os.path.join('20', rel)}" in _error_line(capsys, "eval")
  if kind in ("truncate", "delete"):  # inspect still shows the step, and says what is wrong (sizes only).
    assert main.main(["inspect", copy, "--json"]) == 0
    assert f"is damaged: file {os.path.join('20', rel)}" in json.loads(capsys.readouterr().out)["integrity"]


def test_fallback_moves_the_damaged_step_aside_and_redoes_it_exactly(workdir, copy, caplog):
  _corrupt(os.path.join(runs.checkpoints(copy), "20"), "garbage")
  with caplog.at_level(logging.WARNING):
    assert _train(copy, "--config.checkpoint.fallback=true") == 0
  assert re.search(
    r"step 20 .* is damaged: .*; moved it to .*/20\.corrupt and falling back to step 15 "
    r"\(checkpoint\.fallback=true\)\.",
    caplog.text,
  )
  assert "20.corrupt" in runs.entries(copy)
  runs.assert_same_arrays(runs.read_state(copy, 20), runs.read_state(workdir, 20))
  assert runs.rows(copy) == runs.rows(workdir)


def test_restore_failure_with_intact_files_is_not_called_damage(copy, monkeypatch, capsys):
  """Out of memory (or any orbax/filesystem error) on intact files: named as it is, no step moved."""

  def out_of_memory(*args, **kwargs):
    raise MemoryError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 7.2GiB")

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", out_of_memory)
  before = runs.entries(copy)
  assert _train(copy, "--config.train.steps=30", "--config.checkpoint.fallback=true") == 2
  line = _error_line(capsys, "train")
  assert "Checkpoint step 20" in line and "could not be restored (MemoryError: RESOURCE_EXHAUSTED" in line
  assert "damaged" not in line and "delete" not in line
  assert runs.entries(copy) == before  # fallback=true moved nothing aside: the step is good.


@pytest.mark.parametrize("where", ["orbax-item", "checksums"])
def test_failed_background_write_is_reported(monkeypatch, tmp_path, capsys, where):
  disk_full = OSError(28, "No space left on device")
  if where == "orbax-item":  # orbax writing the meta JSON in its background thread.
    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn  # pylint: disable=protected-access

    async def save_fn(self, item, directory):
      if "10.orbax-checkpoint-tmp" in str(directory):
        raise disk_full
      return await original(self, item, directory)

    monkeypatch.setattr(handler, "_save_fn", save_fn)
  else:  # Our checksums, written in the same thread after every item is complete.
    original = checkpoint.write_checksums

    def write_checksums(step_dir):
      if "10.orbax-checkpoint-tmp" in step_dir:
        raise disk_full
      original(step_dir)

    monkeypatch.setattr(checkpoint, "write_checksums", write_checksums)
  workdir = tmp_path / "run"
  assert _train(workdir) == 2
  line = _error_line(capsys, "train")
  assert f"Writing checkpoint step 10 to {runs.checkpoints(workdir)} failed: the disk is full;" in line
  assert "resume from step 5 (details in" in line
  assert checkpoint.finished_steps(runs.checkpoints(workdir)) == (5,)  # The failed step never became visible.
  if where == "checksums":  # (After a failed orbax item, other items may still be writing in this process.)
    monkeypatch.undo()
    assert _train(workdir) == 0  # Resumes from step 5; the half-written step is cleaned up.
    assert checkpoint.finished_steps(runs.checkpoints(workdir)) == (5, 10, 15, 20) and not runs.temporary(workdir)


def test_best_step_is_kept_besides_the_latest(tmp_path, capsys):
  # Loss falls, so "best" by max loss is the first eval step: kept although keep=1.
  flags = (
    "--config.checkpoint.keep=1",
    "--config.train.eval_every=5",
    "--config.checkpoint.best_metric=loss",
    "--config.checkpoint.best_mode=max",
  )
  assert _train(tmp_path / "run", *flags) == 0
  assert checkpoint.finished_steps(runs.checkpoints(tmp_path / "run")) == (5, 20)
  assert "" == "".join(e for e in runs.entries(tmp_path / "run") if not e.isdigit())  # Trash emptied.
  assert _train(tmp_path / "typo", "--config.checkpoint.best_metric=acuracy") == 2
  assert "checkpoint.best_metric 'acuracy' is not an eval metric" in _error_line(capsys, "train")


def test_leftover_temporary_directories_are_ignored_then_deleted(copy):
  leftover = os.path.join(runs.checkpoints(copy), "25.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(leftover, "state"))
  assert checkpoint.finished_steps(runs.checkpoints(copy)) == (5, 10, 15, 20)
  assert reload.resolve(copy).step == 20
  assert _train(copy) == 0  # Finished run: nothing to train, but the manager cleans up at start.
  assert not os.path.exists(leftover)


def _readme_snippet() -> str:
  with open(os.path.join(runs.REPO, "README.md")) as f:
    text = f.read()
  section = text[text.index("### Reading a checkpoint without jaxcollab") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_recipe_reads_a_checkpoint_without_jaxcollab(workdir, tmp_path):
  code = _readme_snippet()
  placeholder = '"runs/mlp_digits/checkpoints/1000"'
  assert placeholder in code
  step_dir = os.path.join(runs.checkpoints(workdir), "20")  # Saved from 8 devices; read on 1.
  out_file = tmp_path / "params.npz"
  check = """
import sys
assert "jaxcollab" not in sys.modules, "the recipe imported jaxcollab"
flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
np.savez(OUT, **flat)
types = sorted({type(x).__name__ for x in jax.tree.leaves(state)})
print(json.dumps({"model": config["model"]["name"], "devices": jax.device_count(), "types": types}))
"""
  code = code.replace(placeholder, repr(step_dir)) + check.replace("OUT", repr(str(out_file)))
  out = subprocess.run(
    [sys.executable, "-c", code],
    env=runs.env(1),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
    cwd=str(tmp_path),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"model": "mlp", "devices": 1, "types": ["ndarray"]}
  loaded = dict(np.load(out_file))
  _, variables, _ = jaxcollab.load(step_dir)
  expected = {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  }
  assert loaded.keys() == expected.keys()
  for k in expected:
    assert np.array_equal(loaded[k], expected[k]), k


def test_real_process_bad_path_exits_2_with_one_line(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "jaxcollab.main", "inspect", str(tmp_path / "nowhere")],
    env=runs.env(1),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
    f"jaxcollab inspect: error: Checkpoint path {str(tmp_path / 'nowhere')!r} does not exist; pass a workdir, its "
    "checkpoints/ directory or one step directory."
  ]
