"""Seeds in one program: the vmapped runs equal separate `train` runs, and `train` resumes any one of them."""

import os
import signal

import jax
import numpy as np
import pytest

from jaxcollab import config as config_lib
from jaxcollab import records, reload, seeds, train

# Float tolerance between a vmapped and a separate run: XLA may order a batched matmul's sums differently.
RTOL, ATOL = 2e-5, 1e-6
# Parameters: Adam divides by sqrt(v), so a parameter whose gradients are ~0 moves by float noise (~1e-6).
PARAM_ATOL = 1e-5


def _configs(name, *overrides, seeds_=(0, 1)):
  base = config_lib.load_experiment(name, "smoke")
  return [config_lib.apply_overrides(base, [*overrides, f"seed={s}"]) for s in seeds_]


def _rows(workdir):
  return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in records.read_metrics(workdir)]


def _assert_rows_close(a, b):
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if k not in ("step", "split"):
        np.testing.assert_allclose(x[k], y[k], rtol=RTOL, atol=ATOL, err_msg=f"{k} at step {x['step']}")


def _assert_params_close(a, b):
  pa, pb = reload.load(a)[1]["params"], reload.load(b)[1]["params"]
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=PARAM_ATOL)


@pytest.mark.parametrize(
  "name, overrides",
  [
    ("mlp_digits", ["dataset.augment=true"]),  # Per-seed augmentation keys.
    pytest.param("gpt_pydocs", ["model.dropout=0.1", "model.num_layers=1"], marks=pytest.mark.slow),  # Dropout keys.
  ],
)
def test_vmapped_seeds_equal_separate_runs(tmp_path, name, overrides):
  configs = _configs(name, *overrides)
  vmapped = [str(tmp_path / f"v{i}") for i in range(2)]
  results = seeds.train_seeds(configs, vmapped)
  for i, config in enumerate(configs):
    alone = str(tmp_path / f"s{i}")
    result = train.train_and_evaluate(config, alone)
    assert results[i].keys() == result.keys()
    np.testing.assert_allclose(list(results[i].values()), list(result.values()), rtol=RTOL)
    _assert_rows_close(_rows(vmapped[i]), _rows(alone))
    _assert_params_close(vmapped[i], alone)
    assert os.path.exists(os.path.join(vmapped[i], "config.json"))
  # The seeds really differ: their own init, data order and dropout.
  assert results[0]["loss"] != results[1]["loss"]


def test_init_equals_each_runs_own_init():
  stacked = seeds.Stacked(_configs("mlp_digits", seeds_=(0, 3)))
  state = stacked.init_state()
  for i, run in enumerate(stacked.runs):
    alone = run.init_state()
    for x, y in zip(jax.tree.leaves(alone.params), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[i])
    np.testing.assert_array_equal(np.asarray(alone.rng), np.asarray(state.rng)[i])


@pytest.mark.slow
def test_plain_train_resumes_a_stopped_vmapped_seed(tmp_path):
  # 20 steps, checkpoints every 10, five steps a call: the signal after step 10 stops them at 15.
  configs = _configs("mlp_digits", "train.steps_per_call=5")
  workdirs = [str(tmp_path / f"v{i}") for i in range(2)]
  stop = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 10 else None
  assert seeds.train_seeds(configs, workdirs, on_step=stop) == []  # Stopped, every seed saved its step.
  assert all(os.path.isdir(os.path.join(w, "checkpoints", "15")) for w in workdirs)
  resumed = train.train_and_evaluate(configs[1], workdirs[1])  # `jaxcollab train` on one seed's workdir.
  whole = train.train_and_evaluate(configs[1], str(tmp_path / "whole"))
  np.testing.assert_allclose(list(resumed.values()), list(whole.values()), rtol=RTOL)
  _assert_rows_close(_rows(workdirs[1]), _rows(str(tmp_path / "whole")))
  # The other seed, resumed together with nothing else, continues in the vmapped program.
  assert seeds.train_seeds(configs[:1], workdirs[:1]) is not None
