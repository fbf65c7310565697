"""The names each registry accepts, and the checks that need only names, all before jax is imported.

`dataset.name`, `model.activation`, `loss.name`, `optimizer.name`, `optimizer.schedule` and the
metrics that `train.target` and `checkpoint.best_metric` name are checked here, so a mistake in any
of them is one sentence before the training stack (jax, flax, optax, grain: ~0.7 s) starts. The
registries that hold the functions (`data.DATASETS`, `models.activations.ACTIVATIONS`,
`losses.LOSSES`, `optim.OPTIMIZERS`, `optim.SCHEDULES`) have exactly these names; their tests say so.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxcollab import config as config_lib
from jaxcollab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Spec:
  """What is known about a dataset without loading it."""

  kind: str  # "image" | "text"
  eval_split: str  # the split evaluation reports on.
  splits: tuple[str, ...]  # every split that can be read.
  tfds_name: str | None = None  # None for the embedded datasets.
  image_shape: tuple[int, int, int] | None = None  # (H, W, C)
  num_classes: int | None = None


DATASETS: dict[str, Spec] = {
  "digits": Spec("image", "test", ("train", "test"), image_shape=(8, 8, 1), num_classes=10),
  "pydocs": Spec("text", "validation", ("train", "validation")),
  "mnist": Spec("image", "test", ("train", "test"), "mnist", (28, 28, 1), 10),
  "fashion_mnist": Spec("image", "test", ("train", "test"), "fashion_mnist", (28, 28, 1), 10),
  "cifar10": Spec("image", "test", ("train", "test"), "cifar10", (32, 32, 3), 10),
  "tiny_shakespeare": Spec("text", "validation", ("train", "validation", "test"), "tiny_shakespeare"),
  # lm1b has no validation split; its test split plays that role.
  "lm1b": Spec("text", "test", ("train", "test"), "lm1b"),
}
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu", "elu", "leaky_relu", "softplus", "swish", "identity")
LOSSES = ("cross_entropy", "mse", "label_smoothing", "next_token")
# Losses that train language models on next-token targets; every other loss trains classifiers.
TEXT_LOSSES = ("next_token",)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine")
# What evaluation reports per dataset kind: the metrics train.target and checkpoint.best_metric may name.
EVAL_METRICS = {"image": ("loss", "accuracy"), "text": ("loss", "perplexity", "bits_per_byte")}


def lookup(names: tuple[str, ...], key: str, name: str) -> str:
  """`name` if it is one of `names`, else `config.lookup`'s ConfigError naming `key` and the closest name."""
  config_lib.lookup(dict.fromkeys(names), key, name)
  return name


def check_dataset(dataset: ml_collections.ConfigDict) -> Spec:
  """The Spec of `dataset.name`, or a ConfigError for a name or value this dataset cannot use."""
  spec = config_lib.lookup(DATASETS, "dataset.name", dataset.name)
  if spec.kind == "text" and dataset.seq_len <= 0:
    raise ConfigError(f"dataset.seq_len must be positive, got {dataset.seq_len}; set it to e.g. 128.")
  if dataset.num_workers < 0:
    raise ConfigError(f"dataset.num_workers must be >= 0 (0 reads in the main process), got {dataset.num_workers}.")
  return spec


def check_loss(loss_config: ml_collections.ConfigDict, task: str) -> None:
  """A ConfigError when `loss.name` is unknown or does not fit the model's task ("image" or "text")."""
  lookup(LOSSES, "loss.name", loss_config.name)
  if task == "text" and loss_config.name not in TEXT_LOSSES:
    raise ConfigError(f"loss.name must be 'next_token' for the gpt model, got {loss_config.name!r}.")
  if task == "image" and loss_config.name in TEXT_LOSSES:
    raise ConfigError(
      f"loss.name {loss_config.name!r} is for the gpt model; use cross_entropy, mse or "
      "label_smoothing for a classifier."
    )


def check_optimizer(opt_config: ml_collections.ConfigDict, total_steps: int) -> None:
  """A ConfigError for an unknown optimizer or schedule, or a schedule that cannot fit `total_steps`."""
  lookup(OPTIMIZERS, "optimizer.name", opt_config.name)
  lookup(SCHEDULES, "optimizer.schedule", opt_config.schedule)
  k = opt_config.get("accumulate_steps", 1)
  total_updates = total_steps // k
  if total_updates < 1:
    raise ConfigError(
      f"train.steps ({total_steps}) must be at least optimizer.accumulate_steps ({k}), or the optimizer never updates."
    )
  if opt_config.schedule == "warmup_cosine" and -(-opt_config.warmup_steps // k) >= total_updates:
    raise ConfigError(
      f"optimizer.warmup_steps ({opt_config.warmup_steps}) leaves no room for the cosine decay in "
      f"train.steps ({total_steps}) with accumulate_steps {k}; shorten the warmup or train longer."
    )


def check_metrics(config: ml_collections.ConfigDict, kind: str) -> None:
  """A ConfigError when train.target or checkpoint.best_metric names a metric a `kind` run never reports."""
  target = config_lib.parse_target(config.train.target)
  if target and target[0] not in EVAL_METRICS[kind]:
    raise ConfigError(
      f"train.target names {target[0]!r}, which this run never reports; use one of {', '.join(EVAL_METRICS[kind])}."
    )
  best = config.checkpoint.best_metric
  if best and best not in EVAL_METRICS[kind]:
    raise ConfigError(
      f"checkpoint.best_metric {best!r} is not an eval metric of this run; "
      f"choose one of {', '.join(EVAL_METRICS[kind])} or ''."
    )
