"""The whole config is checked before jax starts: every kind of mistake, and a good config in full."""

import json
import subprocess
import sys

import pytest

from jaxcollab import config as config_lib
from jaxcollab import schema
from jaxcollab.errors import UserError

# (experiment, override, what the message says): one of each kind a user can get wrong.
MISTAKES = [
  ("gpt_pydocs", "model.num_layer=3", "Model 'gpt' does not read model.num_layer"),
  ("gpt_pydocs", "model.num_heads=3", "must divide model.embed_dim"),
  ("gpt_pydocs", "model.size=gpt5", "Unknown model.size 'gpt5'"),
  ("gpt_pydocs", "model.name=gtp", "Unknown model.name 'gtp'"),
  ("gpt_pydocs", "model.activation=rleu", "Unknown model.activation 'rleu'"),
  ("gpt_pydocs", "model.dropout=x", "must be float"),
  ("gpt_pydocs", "dataset.name=mnst", "Unknown dataset.name 'mnst'"),
  ("gpt_pydocs", "dataset.name=digits", "cannot train on an image dataset"),
  ("gpt_pydocs", "loss.name=xent", "Unknown loss.name 'xent'"),
  ("gpt_pydocs", "loss.name=mse", "loss.name must be 'next_token'"),
  ("gpt_pydocs", "optimizer.name=adan", "Unknown optimizer.name 'adan'"),
  ("gpt_pydocs", "optimizer.schedule=cos", "Unknown optimizer.schedule 'cos'"),
  ("gpt_pydocs", "optimizer.warmup_steps=5000", "leaves no room for the cosine decay"),
  ("gpt_pydocs", "trian.steps=3", "Unknown config key 'trian.steps'"),
  ("mlp_digits", "model.hidden=-1", "model.hidden must be a positive integer"),
  ("cnn_digits", "model.features=(8,0)", "model.features must be a non-empty tuple"),
  ("mlp_digits", "model.depth=19", "Model 'mlp' does not read model.depth"),
  ("mlp_digits", "train.target=perplexity <= 3", "train.target names 'perplexity', which this run never reports"),
  ("gpt_pydocs", "checkpoint.best_metric=acuracy", "checkpoint.best_metric 'acuracy' is not an eval metric"),
  ("gpt_pydocs", "train.allow_changes=optimizer.lr", "train.allow_changes names 'optimizer.lr'"),
]


@pytest.mark.parametrize("experiment,override,needle", MISTAKES)
def test_each_mistake_is_one_sentence(experiment, override, needle):
  config = config_lib.load_experiment(experiment)
  with pytest.raises(UserError) as e:
    schema.resolve(config_lib.apply_overrides(config, [override]), config_lib.override_keys([override]))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_resnet_checks_its_values():
  overrides = ["model.name=resnet", "model.depth=19"]
  config = config_lib.apply_overrides(config_lib.load_experiment("cnn_digits"), overrides)
  with pytest.raises(UserError, match="model.depth must be 18, 34 or 50"):
    schema.resolve(config, ["model.name"])


def test_the_cli_reports_every_mistake_without_importing_jax(tmp_path):
  # In one process, the CLI as users run it: each mistake exits 2, and after all of them neither jax nor
  # the rest of the training stack has been imported (importing them took ~0.7 s of a 1 s report).
  code = (
    "import json, sys; from jaxcollab import main; cases = json.loads(sys.argv[1]); "
    "codes = [main.main(['train', '--config', e, '--workdir', sys.argv[2], '--config.' + o]) for e, o, _ in cases]; "
    "print(json.dumps([codes, sorted({m.split('.')[0] for m in sys.modules} & "
    "{'jax', 'jaxlib', 'flax', 'optax', 'grain', 'orbax', 'tensorboardX'})]))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, json.dumps(MISTAKES), str(tmp_path / "w")], capture_output=True, text=True, check=True
  )
  codes, imported = json.loads(out.stdout.strip().splitlines()[-1])
  assert codes == [2] * len(MISTAKES)
  assert imported == []
  assert all(needle in out.stderr for _, _, needle in MISTAKES)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("experiment", ["mlp_digits", "cnn_digits", "gpt_pydocs"])
def test_a_good_config_resolves_completely(experiment):
  config = schema.resolve(config_lib.load_experiment(experiment))
  assert config_lib.flat(config) == config_lib.flat(schema.resolve(config))  # Resolving twice changes nothing.
