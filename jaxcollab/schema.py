"""The complete config, checked before jax starts: shared keys, the model's own keys, every registry's names.

Nothing here imports jax, flax, optax or grain (tests/schema_test.py checks it), so the CLI reports
any config mistake in a fraction of a second, before the training stack is imported.
"""

from __future__ import annotations

from collections.abc import Collection

from jaxcollab import choices, models, workdir
from jaxcollab import config as config_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import ConfigError


def resolve(config: ConfigDict, overridden: Collection[str] = (), drop_unread: bool = False) -> ConfigDict:
  """The complete, checked config: shared keys (config), then each component's own keys and names.

  `overridden` are the keys set on the command line (`config.override_keys`), so that a model key
  the chosen model does not read is refused when the user asked for it.
  """
  config = config_lib.validate(config)
  config = models.resolve(config, overridden, drop_unread)
  spec = choices.check_dataset(config.dataset)
  task = models.config_part(config.model.name).TASK
  if spec.kind != task:
    kind = "a text" if spec.kind == "text" else "an image"
    raise ConfigError(
      f"Model {config.model.name!r} cannot train on {kind} dataset {config.dataset.name!r}; use "
      "model.name=gpt for text and mlp/cnn/resnet for images."
    )
  choices.check_loss(config.loss, task)
  choices.check_optimizer(config.optimizer, config.train.steps)
  choices.check_metrics(config, spec.kind)
  workdir.parse_allow_changes(config.train.allow_changes, config)
  return config
