"""Config loading, overrides and validation: every bad input is one sentence, before compiling."""

import os

import pytest

from jaxcollab import config as config_lib
from jaxcollab import run as run_lib
from jaxcollab.errors import UserError

EXPERIMENTS = sorted(
  f[:-3]
  for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "experiments"))
  if f.endswith(".py") and not f.startswith("_")
)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_every_experiment_validates(name, variant):
  config = config_lib.load_experiment(name, variant)
  validated = config_lib.validate(config)
  assert validated.dataset.name == config.dataset.name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_docstring_has_command_and_expectation(name):
  import importlib

  doc = importlib.import_module(f"experiments.{name}").__doc__
  assert f"jaxcollab train --config experiments/{name}.py" in doc
  assert "Expected" in doc


def test_overrides_are_typed():
  c = config_lib.apply_overrides(
    config_lib.defaults(),
    [
      "optimizer.learning_rate=3e-4",
      "train.steps=7",
      "model.features=(8,16)",
      "dataset.augment=true",
      "model.activation=gelu",
      "optimizer.learning_rate=1",
    ],
  )
  assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
  assert c.train.steps == 7 and c.model.features == (8, 16) and c.dataset.augment is True
  assert c.model.activation == "gelu"


def test_json_round_trip():
  c = config_lib.load_experiment("gpt_pydocs")
  back = config_lib.from_json(config_lib.to_json(c))
  assert back.to_dict() == config_lib.validate(c).to_dict()


@pytest.mark.parametrize(
  "override, needle",
  [
    ("optimizer.learnin_rate=0.1", "did you mean 'optimizer.learning_rate'"),
    ("train.steps=ten", "'train.steps' must be int"),
    ("train.steps=1.5", "'train.steps' must be int"),
    ("dataset.augment=maybe", "true or false"),
    ("train.steps", "has no value"),
  ],
)
def test_bad_overrides(override, needle):
  with pytest.raises(UserError, match=None) as e:
    config_lib.apply_overrides(config_lib.defaults(), [override])
  assert needle in str(e.value)


@pytest.mark.parametrize(
  "override, needle",
  [
    ("optimizer.learning_rate=0", "optimizer.learning_rate must be a positive number"),
    ("optimizer.learning_rate=-1e-3", "optimizer.learning_rate must be a positive number"),
    ("train.steps=0", "train.steps must be a positive integer"),
    ("train.batch_size=-4", "train.batch_size must be a positive integer"),
    ("model.activation=relu6x", "Unknown model.activation 'relu6x'"),
    ("model.name=transformer", "Unknown model.name 'transformer'"),
    ("loss.name=hinge", "Unknown loss.name 'hinge'"),
    ("optimizer.name=lamb", "Unknown optimizer.name 'lamb'"),
    ("dataset.name=imagenet21k", "Unknown dataset.name 'imagenet21k'"),
    ("model.name=gpt", "cannot train on an image dataset"),
    ("loss.name=next_token", "next_token' is for the gpt model"),
    ("train.target=accuracy is high", "is not of the form"),
    ("model.dropout=0.1", "Model 'mlp' does not read model.dropout; its keys are model.name, model.activation"),
  ],
)
def test_impossible_values(override, needle):
  c = config_lib.apply_overrides(config_lib.load_experiment("mlp_digits"), [override])
  with pytest.raises(UserError) as e:
    run_lib.resolve(c, config_lib.override_keys([override]))
  assert needle in str(e.value)
  assert "\n" not in str(e.value)


def test_gpt_specific_checks():
  c = config_lib.load_experiment("gpt_pydocs")
  with pytest.raises(UserError, match="must divide model.embed_dim"):
    run_lib.resolve(config_lib.apply_overrides(c, ["model.num_heads=3"]))
  with pytest.raises(UserError, match="exceeds model.context"):
    run_lib.resolve(config_lib.apply_overrides(c, ["dataset.seq_len=4096"]))
  with pytest.raises(UserError, match=r"model.dropout must be in \[0, 1\)"):
    run_lib.resolve(config_lib.apply_overrides(c, ["model.dropout=1.5"]))
  with pytest.raises(UserError, match="Unknown model.size"):
    run_lib.resolve(config_lib.apply_overrides(c, ["model.size=gpt5"]))


def test_experiment_file_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    config_lib.load_experiment(str(tmp_path / "nope.py"))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(UserError, match="has no get_config"):
    config_lib.load_experiment(str(empty))
  typo = tmp_path / "typo.py"
  typo.write_text(
    "from jaxcollab import config\ndef get_config():\n  c = config.defaults()\n  c.train.step = 3\n  return c\n"
  )
  with pytest.raises(UserError, match="did you mean 'train.steps'"):
    config_lib.load_experiment(str(typo))
  with pytest.raises(UserError, match="has no variant 'big'"):
    config_lib.load_experiment("cnn_digits", "big")


def test_parse_target():
  assert config_lib.parse_target("accuracy >= 0.98") == ("accuracy", ">=", 0.98)
  assert config_lib.parse_target("bits_per_byte<2.5") == ("bits_per_byte", "<", 2.5)
  assert config_lib.parse_target("") is None
