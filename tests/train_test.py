"""The training step and loop: purity, jit, falling loss, evaluation coverage, NaN stop, target, workdir."""

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxcollab import config as config_lib
from jaxcollab import data, evaluate, metrics, sharding, train
from jaxcollab import run as run_lib
from jaxcollab.data import augment
from jaxcollab.errors import NonFiniteLossError, UserError

ONE_DEVICE = jax.devices()[:1]


def smoke(name: str, *overrides: str) -> config_lib.ConfigDict:
  return config_lib.apply_overrides(config_lib.load_experiment(name, "smoke"), list(overrides))


def first_batch(run: run_lib.Run, batch_size: int) -> dict:
  it = run.dataset.train_iterator(batch_size=batch_size, seed=0)
  return sharding.to_global(next(it), sharding.batch_sharding(run.mesh))


# Every model family, each on an embedded dataset so the test needs no download.
MODELS = {
  "mlp": ("mlp_digits", []),
  "cnn": ("cnn_digits", []),
  "resnet": ("mlp_digits", ["model.name=resnet", "model.width=8", "model.depth=18"]),
  "gpt": ("gpt_pydocs", []),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_loss_falls_on_a_fixed_batch(model):
  name, overrides = MODELS[model]
  run = run_lib.build(smoke(name, *overrides, "optimizer.schedule=constant"), ONE_DEVICE)
  state = run.init_state()
  batch = first_batch(run, run.config.train.batch_size)
  step = train.jit_train_step(run)
  losses = []
  for _ in range(12):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert all(math.isfinite(x) for x in losses)
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 12


@pytest.mark.parametrize(
  "name, overrides, devices",
  [("gpt_pydocs", [], 1), ("cnn_digits", ["mesh.data=2", "mesh.fsdp=4"], 8)],
)
def test_the_step_compiled_ahead_is_the_one_the_first_step_runs(name, overrides, devices):
  run = run_lib.build(smoke(name, *overrides), jax.devices()[:devices])
  compiles = []
  listener = lambda event, *a, **k: compiles.append(event) if event.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    step, compiled = train.jit_train_step_ahead(run)
    state = run.init_state()  # Compiles beside the step.
    batch = first_batch(run, run.config.train.batch_size)
    compiled()
    ahead = len(compiles)
    state, m = step(state, batch)
    state, m = step(state, batch)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert ahead >= 1 and len(compiles) == ahead  # The real arrays found the executable: nothing compiled again.
  assert int(state.step) == 2 and math.isfinite(float(m["loss"]))


def test_the_step_trains_on_the_images_its_augmentation_draws_describe():
  run = run_lib.build(smoke("cnn_digits"), ONE_DEVICE)
  batch = first_batch(run, run.config.train.batch_size)
  assert augment.KEY in batch  # cnn_digits augments: the pipeline ships draws, not moved images.
  moved = jax.jit(augment.apply_to_batch)(batch)
  assert augment.KEY not in moved
  step = jax.jit(train.train_step)
  state = run.init_state()
  from_draws, m1 = step(state, batch)
  from_moved, m2 = step(state, moved)
  unmoved, m3 = step(state, {k: v for k, v in batch.items() if k != augment.KEY})
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(from_draws.params), jax.tree.leaves(from_moved.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert float(m3["loss"]) != float(m1["loss"])  # The draws did move the pixels.


def test_jit_equals_no_jit():
  # The one-layer GPT with dropout: eager mode dispatches op by op, so keep it small.
  run = run_lib.build(smoke("gpt_pydocs", "model.dropout=0.1", "model.num_layers=1", "train.batch_size=4"), ONE_DEVICE)
  batch = first_batch(run, run.config.train.batch_size)
  jitted, m1 = jax.jit(train.train_step)(run.init_state(), batch)
  eager, m2 = train.train_step(run.init_state(), batch)  # Op by op, as jax dispatches without jit.
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jitted.params), jax.tree.leaves(eager.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_step_is_a_pure_function_of_state_and_batch():
  run = run_lib.build(smoke("gpt_pydocs", "model.dropout=0.2"), ONE_DEVICE)
  batch = first_batch(run, run.config.train.batch_size)
  step = jax.jit(train.train_step)  # No donation: the same state is used twice.
  state = run.init_state()
  a, ma = step(state, batch)
  b, mb = step(state, batch)
  assert float(ma["loss"]) == float(mb["loss"])
  # Dropout draws from fold_in(rng, step): a later step draws other masks from the same batch.
  later, ml = step(state.replace(step=state.step + 1), batch)
  assert float(ml["loss"]) != float(ma["loss"])
  for key in ("loss", "learning_rate", "grad_norm", "param_norm", "bits_per_byte"):
    assert key in ma
  assert "update_norm" not in ma  # train.update_norm is off by default.


@pytest.mark.parametrize("name", ["mlp_digits", "gpt_pydocs"])
def test_update_norm_is_the_norm_of_the_update_and_changes_no_state_bit(name):
  states, metrics = [], []
  for flag in ("false", "true"):
    run = run_lib.build(smoke(name, f"train.update_norm={flag}"), ONE_DEVICE)
    state, step = run.init_state(), train.jit_train_step(run)
    before = jax.device_get(state.params)
    state, m = step(state, first_batch(run, run.config.train.batch_size))
    states.append(jax.device_get(state))
    metrics.append(m)
  assert "update_norm" not in metrics[0] and "update_norm" in metrics[1]
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)  # A metric only: the same parameters and optimizer state.
  change = [np.asarray(a, np.float64) - b for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(before))]
  assert float(metrics[1]["update_norm"]) == pytest.approx(np.sqrt(sum(np.sum(c * c) for c in change)), rel=1e-3)


@pytest.mark.parametrize("name, eval_batch", [("mlp_digits", 64), ("gpt_pydocs", 24)])
def test_evaluation_counts_every_example_once(name, eval_batch):
  config = smoke(name, f"train.eval_batch_size={eval_batch}")
  run = run_lib.build(config, jax.devices())  # 8 devices: padding must still count each example once.
  sums = evaluate.Evaluator(run).sums(run.init_state().params, {})
  if name == "mlp_digits":
    assert sums["count"] == run.dataset.info.eval_size == 360
    assert sums["confusion"].sum() == 360
  else:
    # Every validation byte after the first is a target exactly once.
    assert sums["count"] == len(data.pydocs_bytes("validation")) - 1


def test_stops_on_nan_with_the_step(tmp_path):
  config = smoke("mlp_digits", "optimizer.name=sgd", "optimizer.learning_rate=1e30", "train.steps=20")
  with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
    train.train_and_evaluate(config, str(tmp_path))


def test_target_stops_training_early(tmp_path):
  config = smoke(
    "mlp_digits",
    "train.steps=400",
    "train.eval_every=10",
    "train.target=accuracy >= 0.5",
    "checkpoint.every=100",
    "train.batch_size=64",
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in rows if r["split"] == "eval"]
  assert evals[-1]["accuracy"] >= 0.5 and evals[-1]["step"] < 400
  assert all(r["accuracy"] < 0.5 for r in evals[:-1])
  assert result["accuracy"] >= 0.5


def test_workdir_has_everything(tmp_path):
  workdir = str(tmp_path)
  result = train.train_and_evaluate(smoke("cnn_digits"), workdir)
  for name in ("config.json", "run.json", "metrics.jsonl", "plots/curves.png", "plots/confusion.png", "report.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "20"))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
  for key in ("loss", "accuracy", "learning_rate", "grad_norm", "param_norm", "examples_per_s"):
    assert key in train_rows[0], key
  assert rows[-1]["split"] == "test" and rows[-1]["accuracy"] == result["accuracy"]
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert len(report["per_class"]) == 10 and np.sum(report["confusion"]) == 360
  saved = config_lib.from_json(open(os.path.join(workdir, "config.json")).read())
  assert saved.model.name == "cnn"


def test_impossible_batch_for_mesh():
  with pytest.raises(UserError, match="not divisible by mesh data"):
    run_lib.build(smoke("mlp_digits", "train.batch_size=12"), jax.devices())


@pytest.mark.slow
def test_gpt_learns_more_than_byte_frequencies(tmp_path):
  config = smoke(
    "gpt_pydocs",
    "train.steps=150",
    "train.eval_every=150",
    "dataset.seq_len=64",
    "model.context=64",
    "model.embed_dim=64",
    "model.mlp_dim=256",
    "optimizer.learning_rate=3e-3",
    "train.batch_size=32",
    "checkpoint.every=150",
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["bits_per_byte"] < data.unigram_entropy_bits("validation") - 0.5, result


@pytest.mark.parametrize("name", ["mlp_mnist", "cnn_mnist", "resnet_cifar10", "gpt_shakespeare"])
def test_tfds_experiments_train_end_to_end_under_mock_data(tmp_path, name):
  """The TFDS experiments' smoke variants, through the real tfds.data_source code on mock records."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = smoke(name, f"dataset.data_dir={tmp_path / 'tfds'}")
  with tfds.testing.mock_data(num_examples=64):
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert all(math.isfinite(v) for v in result.values())
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"][-1] == config.train.steps
  assert ("accuracy" in result) == (name != "gpt_shakespeare")


@pytest.mark.parametrize("name", ["mlp_digits", "cnn_digits"])
def test_several_steps_per_call_equal_one_step_per_call(tmp_path, name):
  """train.steps_per_call unrolls steps into one jitted call: every metrics row is the same, exactly."""
  # eval_every=7 is no multiple of 4: the calls that would cross an evaluation run single steps.
  common = ("train.steps=30", "train.eval_every=7", "train.log_every=3", "checkpoint.every=30", "train.batch_size=32")
  rows = {}
  for per_call in (1, 4):
    workdir = tmp_path / str(per_call)
    train.train_and_evaluate(smoke(name, *common, f"train.steps_per_call={per_call}"), str(workdir))
    rows[per_call] = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows[4] if r["split"] == "train"] == list(range(3, 31, 3))
  assert all(0 < r["examples_per_s"] < math.inf for r in rows[4] if r["split"] == "train")
  drop_rate = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]
  assert drop_rate(rows[4]) == drop_rate(rows[1])


class _Rows:
  """A MetricWriter stand-in that keeps the rows."""

  def __init__(self):
    self.rows = []

  def write(self, step, split, values):
    self.rows.append((step, split, values))


def _log(calls, in_flight, log_every=2):
  """Rows a StepLogger writes for `calls` [(count, losses)], pulling metrics `in_flight` calls late."""
  config = smoke("mlp_digits", f"train.log_every={log_every}", "train.steps=12")
  writer = _Rows()
  logger = train.StepLogger(writer, metrics.Progress(12, enabled=False), config, 0, 32, "examples_per_s", in_flight)
  step = 0
  for count, losses in calls:
    step += max(count, 1)
    logger.push(step, {"loss": jax.numpy.asarray(losses if count else losses[0])}, count)
  logger.flush()
  return writer.rows


def test_step_logger_rows_do_not_depend_on_how_late_metrics_are_pulled():
  calls = [(0, [1.0]), (4, [2.0, 3.0, 4.0, 5.0]), (0, [6.0]), (3, [7.0, 8.0, 9.0]), (3, [10.0, 11.0, 12.0])]
  rows = {n: _log(calls, n) for n in (1, 2, 4)}
  assert [(s, v["loss"]) for s, _, v in rows[1]] == [(s, float(s)) for s in range(2, 13, 2)]
  for n in (2, 4):
    assert [(s, split, v["loss"]) for s, split, v in rows[n]] == [(s, split, v["loss"]) for s, split, v in rows[1]]
    assert all(0 < v["examples_per_s"] < math.inf for _, _, v in rows[n])


@pytest.mark.parametrize("in_flight", [1, 3])
def test_step_logger_names_the_first_non_finite_step_inside_a_call(in_flight):
  calls = [(4, [1.0, 2.0, 3.0, 4.0]), (4, [5.0, math.inf, math.nan, 6.0]), (1, [7.0]), (1, [8.0])]
  with pytest.raises(NonFiniteLossError, match="became inf at step 6;"):
    _log(calls, in_flight)
