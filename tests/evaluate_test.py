"""The Evaluator's cache: the same parameter arrays are evaluated once, new ones always."""

import jax
import numpy as np

from jaxcollab import config as config_lib
from jaxcollab import evaluate
from jaxcollab import run as run_lib


def test_cache_follows_the_parameters_not_the_step(monkeypatch):
  config = config_lib.apply_overrides(config_lib.load_experiment("mlp_digits", "smoke"), [])
  run = run_lib.build(config, jax.devices()[:1])
  evaluator = evaluate.Evaluator(run)
  passes = []
  real_sums = evaluator.sums
  monkeypatch.setattr(evaluator, "sums", lambda p, b: passes.append(1) or real_sums(p, b))
  state = run.init_state()
  first = evaluator.evaluate(state)
  assert evaluator.evaluate(state) == first and len(passes) == 1  # Same arrays: no second pass.
  # Other parameters at the same step (e.g. init_from, or a restored checkpoint) are evaluated anew.
  scaled = state.replace(params=jax.tree.map(lambda x: x * 0.5, state.params))
  assert int(scaled.step) == int(state.step)
  second = evaluator.evaluate(scaled)
  assert len(passes) == 2 and not np.isclose(second["loss"], first["loss"])
