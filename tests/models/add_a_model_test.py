"""README's "Add a model": the example file, registered by one line, builds, trains and is checked."""

import os
import re
import sys

import jax
import pytest

from jaxcollab import config as config_lib
from jaxcollab import models, train
from jaxcollab import run as run_lib
from jaxcollab.errors import UserError

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def readme_blocks(after: str) -> list[str]:
  """The ```python blocks of README's section titled `after`."""
  with open(README) as f:
    text = f.read()
  section = text.split(after, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def linear(tmp_path, monkeypatch):
  module_file, registry_line = readme_blocks("### Add a model")
  (tmp_path / "linear_example.py").write_text(module_file)
  monkeypatch.syspath_prepend(str(tmp_path))
  name, path = re.fullmatch(r'\s*"(\w+)": "([\w.]+)",\s*', registry_line).groups()
  assert (name, path) == ("linear", "jaxcollab.models.linear")
  monkeypatch.setitem(models.MODELS, name, "linear_example")  # The same line, pointing at the tmp file.
  yield
  sys.modules.pop("linear_example", None)


def smoke(*overrides: str) -> config_lib.ConfigDict:
  return config_lib.apply_overrides(config_lib.load_experiment("mlp_digits", "smoke"), list(overrides))


def test_example_model_trains(linear, tmp_path):
  overrides = ["model.name=linear", "model.scale=2.0", "train.steps=30", "train.eval_every=30"]
  config = run_lib.resolve(smoke(*overrides), config_lib.override_keys(overrides))
  assert config.model.scale == 2.0 and "hidden" not in config.model
  run = run_lib.build(config)
  assert sum(x.size for x in jax.tree.leaves(run.abstract_state.params)) == 64 * 10 + 10
  result = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert result["accuracy"] > 0.5  # From all-zero weights (10% by chance): it trained.


def test_example_model_keys_are_checked(linear):
  overrides = ["model.name=linear", "model.scale=-1"]
  with pytest.raises(UserError, match="model.scale must be > 0"):
    run_lib.resolve(smoke(*overrides), config_lib.override_keys(overrides))
  overrides = ["model.name=linear", "model.hidden=512"]
  with pytest.raises(UserError, match="Model 'linear' does not read model.hidden; its keys are .*model.scale"):
    run_lib.resolve(smoke(*overrides), config_lib.override_keys(overrides))
