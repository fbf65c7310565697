"""Experiment configs: the schema of every key, loading, CLI overrides and validation.

Every experiment file starts from `defaults()` and changes what it needs, so the
schema below is the single list of valid keys. Validation runs before anything
compiles and raises `UserError` with one sentence naming the key and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


class UserError(ValueError):
  """A mistake in what the user asked for; the CLI prints it as one sentence and exits 2."""


def defaults() -> ConfigDict:
  """Every valid key with its default; experiments override a few of them."""
  c = ConfigDict()
  c.seed = 0  # int: seed for parameter init, dropout and data order.
  c.init_from = ""  # str: checkpoint (workdir or step dir) whose params start training; "" = none.

  c.dataset = ConfigDict()
  c.dataset.name = "digits"  # digits | pydocs | mnist | fashion_mnist | cifar10 | tiny_shakespeare | lm1b
  c.dataset.data_dir = ""  # str: TFDS data_dir; "" = TFDS default (~/tensorflow_datasets).
  c.dataset.seq_len = 128  # int: tokens (bytes) per LM example; text datasets only.
  c.dataset.augment = False  # bool: random translation/crop, small rotation, flip (image train split).
  c.dataset.flip = False  # bool: horizontal flips in augmentation (not for digits).
  c.dataset.num_workers = 0  # int: grain worker processes; 0 = in the main process.

  c.model = ConfigDict()
  c.model.name = "mlp"  # mlp | cnn | resnet | gpt
  c.model.activation = "relu"  # relu | gelu | tanh | sigmoid | silu | elu | leaky_relu | softplus | swish | identity
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32).
  c.model.hidden = 1024  # mlp: width of the hidden Dense layer.
  c.model.features = (32, 64)  # cnn: output channels of each 3x3 conv (each followed by 2x2 avg-pool).
  c.model.dense = 256  # cnn: width of the Dense layer after the conv stack.
  c.model.depth = 18  # resnet: 18 | 34 | 50
  c.model.width = 64  # resnet: channels of the first stage.
  c.model.stem = "cifar"  # resnet: cifar (3x3 conv) | imagenet (7x7/2 conv + max-pool)
  c.model.size = ""  # gpt: named size (gpt2-124m, gpt2-medium, tiny, small, ...) or "" to use the fields below.
  c.model.num_layers = 4  # gpt: transformer blocks.
  c.model.num_heads = 4  # gpt: attention heads; must divide embed_dim.
  c.model.embed_dim = 128  # gpt: residual stream width.
  c.model.mlp_dim = 512  # gpt: hidden width of each block's MLP.
  c.model.context = 256  # gpt: learned positions (max sequence length); >= dataset.seq_len.
  c.model.dropout = 0.0  # gpt: dropout rate in [0, 1).
  c.model.remat = False  # gpt: rematerialise each block in the backward pass (saves memory).
  c.model.tied = True  # gpt: output head shares the token embedding matrix.

  c.loss = ConfigDict()
  c.loss.name = "cross_entropy"  # cross_entropy | mse | label_smoothing (classifiers); next_token (LMs)
  c.loss.label_smoothing = 0.1  # float in [0, 1): smoothing for loss.name=label_smoothing.

  c.optimizer = ConfigDict()
  c.optimizer.name = "adam"  # adam | adamw | sgd
  c.optimizer.learning_rate = 1e-3  # float > 0: peak learning rate.
  c.optimizer.schedule = "constant"  # constant | warmup_cosine
  c.optimizer.warmup_steps = 0  # int >= 0: linear warmup steps (warmup_cosine).
  c.optimizer.end_learning_rate = 0.0  # float >= 0: final rate of the cosine decay.
  c.optimizer.b1 = 0.9  # adam/adamw first-moment decay.
  c.optimizer.b2 = 0.999  # adam/adamw second-moment decay.
  c.optimizer.weight_decay = 0.0  # adamw: decoupled decay (never on biases or norm scales).
  c.optimizer.momentum = 0.9  # sgd: momentum; 0 = plain SGD.
  c.optimizer.nesterov = False  # sgd: Nesterov momentum.
  c.optimizer.grad_clip = 0.0  # float >= 0: clip the global gradient norm to this; 0 = off.
  c.optimizer.accumulate_steps = 1  # int >= 1: micro-batches per update (optax.MultiSteps).

  c.train = ConfigDict()
  c.train.steps = 1000  # int > 0: training steps (batches).
  c.train.batch_size = 128  # int > 0: global batch, split over processes and the data/fsdp mesh axes.
  c.train.eval_batch_size = 256  # int > 0: global batch for evaluation.
  c.train.eval_every = 200  # int > 0: evaluate every this many steps (and at the end).
  c.train.log_every = 50  # int > 0: write train metrics every this many steps.
  c.train.target = ""  # str: stop once eval meets it, e.g. "accuracy >= 0.98"; "" = never.
  # str: comma-separated keys that may differ from the checkpoint's config on resume, e.g.
  # "optimizer.learning_rate"; recorded in run.json. See jaxcollab/workdir.py for the keys always allowed.
  c.train.allow_changes = ""

  c.checkpoint = ConfigDict()
  c.checkpoint.every = 500  # int > 0: save every this many steps (and at the end).
  c.checkpoint.keep = 3  # int > 0: newest checkpoints kept (plus the best one).
  c.checkpoint.best_metric = ""  # str: eval metric that marks the best step kept, e.g. "accuracy"; "" = none.
  c.checkpoint.best_mode = "max"  # max | min: whether a larger best_metric is better.
  c.checkpoint.fallback = False  # bool: on a corrupt newest step, restore the previous good one.
  c.checkpoint.async_save = True  # bool: write checkpoints in the background.

  c.mesh = ConfigDict()
  c.mesh.data = -1  # int: data-parallel devices; -1 = all devices the other axes leave.
  c.mesh.fsdp = 1  # int: devices that shard parameters and optimizer state (and the batch).
  c.mesh.tensor = 1  # int: devices that shard attention heads and MLP width (Megatron-style).
  # Logical axis name -> mesh axis (or "" to replicate). See jaxcollab/sharding.py.
  c.mesh.rules = (
      ("batch", "data,fsdp"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", ""),
      ("vocab", "tensor"),
      ("hidden", "tensor"),
      ("conv_in", ""),
      ("conv_out", "fsdp"),
      ("classes", ""),
      ("norm", ""),
  )
  return c


# Names each registry must know; filled lazily so that `config` imports nothing heavy.
def _registries() -> dict[str, Any]:
  from jaxcollab import data, losses, models, optim  # pylint: disable=g-import-not-at-top

  return {
      "dataset.name": data.DATASETS,
      "model.name": models.MODELS,
      "model.activation": models.ACTIVATIONS,
      "loss.name": losses.LOSSES,
      "optimizer.name": optim.OPTIMIZERS,
      "optimizer.schedule": optim.SCHEDULES,
  }


def load_experiment(path: str, arg: str | None = None) -> ConfigDict:
  """Runs `get_config(arg)` from an experiment file (a path, or `name` under experiments/)."""
  if ":" in os.path.basename(path) and arg is None:
    path, arg = path.rsplit(":", 1)
  if os.path.sep not in path and not os.path.isfile(path):  # A name or a file name: look in experiments/.
    candidate = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", path.removesuffix(".py") + ".py")
    path = candidate if os.path.exists(candidate) else path
  if not os.path.isfile(path):
    raise UserError(f"Experiment file {path!r} does not exist; pass a path such as experiments/cnn_digits.py.")
  spec = importlib.util.spec_from_file_location(f"_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A broken experiment file is the user's to fix; say where.
    raise UserError(f"Experiment file {path!r} failed to import ({type(e).__name__}: {e}); fix the file.") from e
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"Experiment file {path!r} has no get_config(); define get_config(arg=None) returning a ConfigDict.")
  if arg is not None and not inspect.signature(module.get_config).parameters:
    raise UserError(f"get_config() in {path!r} takes no argument, so variant {arg!r} cannot be passed; drop "
                    f"':{arg}' or define get_config(arg=None).")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except UserError:
    raise
  except Exception as e:  # A broken get_config is the user's to fix; say where.
    raise UserError(f"get_config() in {path!r} failed ({type(e).__name__}: {e}); fix the file.") from e
  if not isinstance(config, ConfigDict):
    raise UserError(f"get_config() in {path!r} returned {type(config).__name__}; return an ml_collections.ConfigDict.")
  check_keys(config)
  return config


def _flat(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value
  return out


def _unknown_key_error(key: str, where: str) -> UserError:
  valid = list(_flat(defaults()))
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  hint = f"did you mean {close[0]!r}?" if close else "see jaxcollab/config.py:defaults() for the valid keys."
  return UserError(f"Unknown config key {key!r} {where}; {hint}")


def check_keys(config: ConfigDict) -> None:
  """Every key of `config` must exist in `defaults()` with a compatible type."""
  schema = _flat(defaults())
  for key, value in _flat(config).items():
    if key not in schema:
      raise _unknown_key_error(key, "in the experiment")
    _check_type(key, value, schema[key])


def _check_type(key: str, value: Any, default: Any) -> None:
  expected = type(default)
  ok = isinstance(value, expected) or (expected is float and isinstance(value, int) and not isinstance(value, bool))
  if expected is int and isinstance(value, bool):
    ok = False
  if expected is tuple and isinstance(value, list):
    ok = True
  if not ok:
    raise UserError(
        f"Config key {key!r} must be {expected.__name__} (like {default!r}), got {type(value).__name__} {value!r}."
    )


def _parse_value(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise UserError(f"Config key {key!r} must be true or false, got {text!r}.")
  if isinstance(default, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(
        f"Config key {key!r} must be {type(default).__name__} (like {default!r}), got {text!r}."
    ) from None
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(default, tuple) and isinstance(value, (list, int, str)):
    value = tuple(value) if isinstance(value, list) else (value,)
  _check_type(key, value, default)
  return value


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
  """Applies `a.b=value` strings (from `--config.a.b=value`), type-checked against the schema."""
  schema = _flat(defaults())
  config = ConfigDict(config.to_dict())
  for item in overrides:
    if "=" not in item:
      raise UserError(f"Override {item!r} has no value; write --config.{item}=VALUE.")
    key, text = item.split("=", 1)
    key = key.removeprefix("--config.").removeprefix("config.")
    if key not in schema:
      raise _unknown_key_error(key, "on the command line")
    value = _parse_value(key, text, schema[key])
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = value
  return config


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


_TARGET = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def parse_target(target: str) -> tuple[str, str, float] | None:
  """'accuracy >= 0.98' -> ('accuracy', '>=', 0.98); '' -> None."""
  if not target:
    return None
  m = _TARGET.match(target)
  if not m:
    raise UserError(f"train.target {target!r} is not of the form 'METRIC >= VALUE' (e.g. 'accuracy >= 0.98').")
  return m.group(1), m.group(2), float(m.group(3))


def validate(config: ConfigDict) -> ConfigDict:
  """Checks names, ranges and the model/dataset pairing; returns the config unchanged."""
  check_keys(config)
  full = defaults()
  full.update(config)  # Missing keys take their defaults.
  config = full
  for key, registry in _registries().items():
    section, name = key.split(".")
    value = config[section][name]
    if value not in registry:
      close = difflib.get_close_matches(value, list(registry), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise UserError(f"Unknown {key} {value!r}{hint}; choose one of {', '.join(sorted(registry))}.")
  o, t, m = config.optimizer, config.train, config.model
  _require(o.learning_rate > 0 and math.isfinite(o.learning_rate),
           f"optimizer.learning_rate must be a positive number, got {o.learning_rate}.")
  _require(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}.")
  _require(o.end_learning_rate >= 0, f"optimizer.end_learning_rate must be >= 0, got {o.end_learning_rate}.")
  _require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}.")
  _require(o.grad_clip >= 0, f"optimizer.grad_clip must be >= 0 (0 turns clipping off), got {o.grad_clip}.")
  _require(o.accumulate_steps >= 1, f"optimizer.accumulate_steps must be >= 1, got {o.accumulate_steps}.")
  _require(0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}.")
  for key in ("steps", "batch_size", "eval_batch_size", "eval_every", "log_every"):
    _require(t[key] > 0, f"train.{key} must be a positive integer, got {t[key]}.")
  _require(config.checkpoint.every > 0, f"checkpoint.every must be > 0, got {config.checkpoint.every}.")
  _require(config.checkpoint.keep > 0, f"checkpoint.keep must be > 0, got {config.checkpoint.keep}.")
  _require(config.checkpoint.best_mode in ("max", "min"),
           f"checkpoint.best_mode must be 'max' or 'min', got {config.checkpoint.best_mode!r}.")
  _require(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}.")
  _require(0 <= config.loss.label_smoothing < 1,
           f"loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}.")
  _require(m.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {m.dtype!r}.")
  for key in ("hidden", "dense", "width", "num_layers", "num_heads", "embed_dim", "mlp_dim", "context"):
    _require(m[key] > 0, f"model.{key} must be a positive integer, got {m[key]}.")
  _require(len(m.features) > 0 and all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in m.features),
           f"model.features must be a non-empty tuple of positive ints such as (32, 64), got {tuple(m.features)}.")
  _require(0 <= config.seed < 2**32, f"seed must be an integer in [0, 2**32), got {config.seed}.")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {o.b1}, {o.b2}.")
  _require(config.dataset.num_workers >= 0, f"dataset.num_workers must be >= 0, got {config.dataset.num_workers}.")
  _require(config.dataset.seq_len > 0, f"dataset.seq_len must be a positive integer, got {config.dataset.seq_len}.")
  for rule in config.mesh.rules:
    _require(isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(r, str) for r in rule),
             f"mesh.rules entries must be pairs of strings such as ('embed', 'fsdp'), got {rule!r}.")
  _require(m.depth in (18, 34, 50), f"model.depth must be 18, 34 or 50, got {m.depth}.")
  _require(m.stem in ("cifar", "imagenet"), f"model.stem must be 'cifar' or 'imagenet', got {m.stem!r}.")
  parse_target(t.target)

  from jaxcollab import data, models  # pylint: disable=g-import-not-at-top

  text = data.DATASETS[config.dataset.name].kind == "text"
  is_lm = m.name == "gpt"
  if text != is_lm:
    kind = "a text" if text else "an image"
    raise UserError(
        f"Model {m.name!r} cannot train on {kind} dataset {config.dataset.name!r}; "
        f"use model.name=gpt for text and mlp/cnn/resnet for images."
    )
  if is_lm:
    _require(config.loss.name == "next_token",
             f"loss.name must be 'next_token' for the gpt model, got {config.loss.name!r}.")
    if m.size:
      _require(m.size in models.GPT_SIZES,
               f"Unknown model.size {m.size!r}; choose one of {', '.join(sorted(models.GPT_SIZES))}.")
    dims = models.gpt_dims(m)
    _require(dims["embed_dim"] % dims["num_heads"] == 0,
             f"model.num_heads ({dims['num_heads']}) must divide model.embed_dim ({dims['embed_dim']}).")
    _require(config.dataset.seq_len <= dims["context"],
             f"dataset.seq_len ({config.dataset.seq_len}) exceeds model.context ({dims['context']}); "
             "raise model.context or lower dataset.seq_len.")
  else:
    _require(config.loss.name != "next_token",
             f"loss.name 'next_token' is for the gpt model; use cross_entropy, mse or label_smoothing for {m.name!r}.")
  return config


def to_json(config: ConfigDict) -> str:
  """The resolved config as indented JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
  """Inverse of `to_json`: lists go back to tuples where the schema has tuples."""
  raw = json.loads(text)
  config = defaults()
  schema = _flat(config)

  def fill(node: ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      name = prefix + key
      if isinstance(value, dict):
        fill(node[key], value, name + ".")
      elif name in schema:
        if isinstance(schema[name], tuple):
          value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        with node.ignore_type():
          node[key] = value
      else:
        raise _unknown_key_error(name, "in the saved config")

  fill(config, raw, "")
  return config


def check_variant(arg: str | None, variants: tuple[str, ...], experiment: str) -> None:
  """An experiment's `get_config(arg)` accepts only the variants it defines."""
  if arg is not None and arg not in variants:
    raise UserError(f"Experiment {experiment!r} has no variant {arg!r}; use one of {', '.join(variants)} or none.")
