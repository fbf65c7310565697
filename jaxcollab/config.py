"""Experiment configs: the schema of the shared keys, loading, CLI overrides, JSON and the generic checks.

Every experiment file starts from `defaults()` and changes what it needs. The `model` section holds
only the keys every model reads (name, activation, dtype); each model's config part
(`models/<name>_config.py`) declares the rest of its own fields, and `jaxcollab.schema.resolve` completes
and checks them. Nothing here imports jax, so a typo in any key is reported at once, in one sentence.
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
from typing import Any, TypeAlias

import ml_collections

from jaxcollab.errors import ConfigError

ConfigDict: TypeAlias = ml_collections.ConfigDict


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
  c.model.name = "mlp"  # mlp | cnn | resnet | gpt (jaxcollab/models/<name>.py declares its own further keys)
  c.model.activation = "relu"  # relu | gelu | tanh | sigmoid | silu | elu | leaky_relu | softplus | swish | identity
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32).

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
  # int > 0: steps unrolled into one jitted call (Keras' steps_per_execution): less host work per step
  # for models whose step takes about a millisecond, at k times the compile time. 1 = one step a call.
  c.train.steps_per_call = 1
  # bool: also log update_norm, the global norm of each step's parameter update. Off by default: on
  # XLA:CPU it is 20 of the gpt_pydocs step's 171 kernels, 0.25-0.4 s of each cold start (README).
  c.train.update_norm = False
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
    ("layers", ""),  # The stacked axis of model.scan_layers: every device holds all layers of its shard.
  )
  return c


SHARED_MODEL_KEYS = ("name", "activation", "dtype")
DTYPES = ("float32", "bfloat16")


def lookup(registry: dict[str, Any], key: str, name: str) -> Any:
  """registry[name], or a ConfigError naming `key`, the closest valid name and all of them."""
  if name in registry:
    return registry[name]
  close = difflib.get_close_matches(str(name), list(registry), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise ConfigError(f"Unknown {key} {name!r}{hint}; choose one of {', '.join(sorted(registry))}.")


def experiment_dirs() -> list[str]:
  """Where `--config NAME` looks: the installed jaxcollab.experiments package, then a checkout's experiments/."""
  package = os.path.dirname(os.path.abspath(__file__))
  return [os.path.join(package, "experiments"), os.path.join(os.path.dirname(package), "experiments")]


def _experiment_path(path: str) -> str:
  if os.path.isfile(path) or os.path.sep in path:
    return path
  for directory in experiment_dirs():
    candidate = os.path.join(directory, path.removesuffix(".py") + ".py")
    if os.path.isfile(candidate):
      return candidate
  return path


def import_experiment(path: str, arg: str | None = None) -> tuple[Any, str, str | None]:
  """(module, file, arg) of an experiment given as a path, a name such as `cnn_digits`, or `FILE:ARG`."""
  if ":" in os.path.basename(path) and arg is None:
    path, arg = path.rsplit(":", 1)
  path = _experiment_path(path)
  if not os.path.isfile(path):
    names = sorted(
      {
        f[:-3]
        for d in experiment_dirs()
        if os.path.isdir(d)
        for f in os.listdir(d)
        if f.endswith(".py") and not f.startswith("_")
      }
    )
    raise ConfigError(
      f"Experiment file {path!r} does not exist; pass a path such as experiments/cnn_digits.py "
      f"or one of the names {', '.join(names)}."
    )
  spec = importlib.util.spec_from_file_location(f"_experiment_{abs(hash(path))}", path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A broken experiment file is the user's to fix; say where.
    raise ConfigError(f"Experiment file {path!r} failed to import ({type(e).__name__}: {e}); fix the file.") from e
  return module, path, arg


def load_experiment(path: str, arg: str | None = None) -> ConfigDict:
  """Runs `get_config(arg)` from an experiment file (a path, or a name such as `cnn_digits`)."""
  module, path, arg = import_experiment(path, arg)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(
      f"Experiment file {path!r} has no get_config(); define get_config(arg=None) returning a ConfigDict."
    )
  if arg is not None and not inspect.signature(get_config).parameters:
    raise ConfigError(
      f"Experiment file {path!r} has no variants (its get_config() takes no argument); drop ':{arg}' from --config."
    )
  try:
    config = get_config(arg) if arg is not None else get_config()
  except ConfigError:
    raise
  except Exception as e:  # A broken get_config is the user's to fix; say where.
    raise ConfigError(f"get_config() in {path!r} failed ({type(e).__name__}: {e}); fix the file.") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"get_config() in {path!r} returned {type(config).__name__}; return an ml_collections.ConfigDict."
    )
  check_keys(config)
  return config


def flat(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} for every leaf of `config`."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat(value, name + "."))
    else:
      out[name] = value
  return out


def _model_specific(key: str) -> bool:
  """model.* keys other than the shared ones: their model's file declares and checks them."""
  section, _, name = key.partition(".")
  return section == "model" and name not in SHARED_MODEL_KEYS


def _unknown_key_error(key: str, where: str) -> ConfigError:
  valid = list(flat(defaults()))
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  hint = f"did you mean {close[0]!r}?" if close else "see jaxcollab/config.py:defaults() for the valid keys."
  return ConfigError(f"Unknown config key {key!r} {where}; {hint}")


def check_keys(config: ConfigDict) -> None:
  """Every shared key of `config` must exist in `defaults()` with a compatible type (model fields: later)."""
  schema = flat(defaults())
  for key, value in flat(config).items():
    if key in schema:
      coerce(key, value, schema[key])
    elif not _model_specific(key):
      raise _unknown_key_error(key, "in the experiment")


def coerce(key: str, value: Any, default: Any) -> Any:
  """`value` as the type of `default` (text from the command line is parsed), or a ConfigError."""
  if isinstance(value, str) and not isinstance(default, str):
    return _parse_value(key, value, default)
  expected = type(default)
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if expected is tuple and isinstance(value, list):
    value = tuple(value)
  ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
  if ok and expected is tuple and default and value:
    # Items must have the type of the default's items (e.g. ints for model.features).
    item_type = type(default[0])
    ok = all(isinstance(v, item_type) and not (item_type is int and isinstance(v, bool)) for v in value)
    if not ok:
      raise ConfigError(
        f"Config key {key!r} must be a tuple of {item_type.__name__} (like {default!r}), got {value!r}."
      )
  if not ok:
    raise ConfigError(
      f"Config key {key!r} must be {expected.__name__} (like {default!r}), got {type(value).__name__} {value!r}."
    )
  return value


def _parse_value(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"Config key {key!r} must be true or false, got {text!r}.")
  if isinstance(default, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(
      f"Config key {key!r} must be {type(default).__name__} (like {default!r}), got {text!r}."
    ) from None
  if isinstance(default, tuple) and isinstance(value, (int, float, str)):
    value = (value,)
  return coerce(key, value, default)


def _parse_unchecked(text: str) -> Any:
  """A model-specific override's value before its model's schema is known: a literal, else the text."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return tuple(value) if isinstance(value, list) else value


def override_keys(overrides: list[str]) -> list[str]:
  """'model.hidden' for '--config.model.hidden=512'."""
  return [item.split("=", 1)[0].removeprefix("--config.").removeprefix("config.") for item in overrides]


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
  """Applies `a.b=value` strings (from `--config.a.b=value`), type-checked against the schema.

  Model-specific keys are parsed as literals here and checked against their model's fields by
  `jaxcollab.schema.resolve`, which knows which model reads them.
  """
  schema = flat(defaults())
  config = ConfigDict(config.to_dict())
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override {item!r} has no value; write --config.{item}=VALUE.")
    key, text = item.split("=", 1)
    key = key.removeprefix("--config.").removeprefix("config.")
    if key in schema:
      value = _parse_value(key, text, schema[key])
    elif _model_specific(key) and "." not in key.partition(".")[2]:
      value = _parse_unchecked(text)
    else:
      raise _unknown_key_error(key, "on the command line")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = value
  return config


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


_TARGET = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def parse_target(target: str) -> tuple[str, str, float] | None:
  """'accuracy >= 0.98' -> ('accuracy', '>=', 0.98); '' -> None."""
  if not target:
    return None
  m = _TARGET.match(target)
  if not m:
    raise ConfigError(f"train.target {target!r} is not of the form 'METRIC >= VALUE' (e.g. 'accuracy >= 0.98').")
  return m.group(1), m.group(2), float(m.group(3))


def validate(config: ConfigDict) -> ConfigDict:
  """Checks the shared keys' types and ranges; returns the config with missing shared keys at their defaults.

  Names in registries (dataset, model, loss, optimizer) and the model's own fields are checked by
  their owners in `jaxcollab.schema.resolve`, after this.
  """
  check_keys(config)
  full = defaults()
  full.update(config)  # Missing keys take their defaults.
  config = full
  o, t, m = config.optimizer, config.train, config.model
  _require(
    o.learning_rate > 0 and math.isfinite(o.learning_rate),
    f"optimizer.learning_rate must be a positive number, got {o.learning_rate}.",
  )
  _require(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}.")
  _require(o.end_learning_rate >= 0, f"optimizer.end_learning_rate must be >= 0, got {o.end_learning_rate}.")
  _require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}.")
  _require(o.grad_clip >= 0, f"optimizer.grad_clip must be >= 0 (0 turns clipping off), got {o.grad_clip}.")
  _require(o.accumulate_steps >= 1, f"optimizer.accumulate_steps must be >= 1, got {o.accumulate_steps}.")
  _require(0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}.")
  for key in ("steps", "batch_size", "eval_batch_size", "eval_every", "log_every", "steps_per_call"):
    _require(t[key] > 0, f"train.{key} must be a positive integer, got {t[key]}.")
  _require(config.checkpoint.every > 0, f"checkpoint.every must be > 0, got {config.checkpoint.every}.")
  _require(config.checkpoint.keep > 0, f"checkpoint.keep must be > 0, got {config.checkpoint.keep}.")
  _require(
    config.checkpoint.best_mode in ("max", "min"),
    f"checkpoint.best_mode must be 'max' or 'min', got {config.checkpoint.best_mode!r}.",
  )
  _require(
    0 <= config.loss.label_smoothing < 1, f"loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}."
  )
  _require(m.dtype in DTYPES, f"model.dtype must be float32 or bfloat16, got {m.dtype!r}.")
  _require(0 <= config.seed < 2**32, f"seed must be an integer in [0, 2**32), got {config.seed}.")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {o.b1}, {o.b2}.")
  _require(config.dataset.num_workers >= 0, f"dataset.num_workers must be >= 0, got {config.dataset.num_workers}.")
  _require(config.dataset.seq_len > 0, f"dataset.seq_len must be a positive integer, got {config.dataset.seq_len}.")
  for rule in config.mesh.rules:
    _require(
      isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(r, str) for r in rule),
      f"mesh.rules entries must be pairs of strings such as ('embed', 'fsdp'), got {rule!r}.",
    )
  parse_target(t.target)
  return config


def to_json(config: ConfigDict) -> str:
  """The resolved config as indented JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
  """Inverse of `to_json`: lists go back to tuples; model-specific keys are kept for their model to check."""
  raw = json.loads(text)
  config = defaults()
  schema = flat(config)

  def fill(node: ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      name = prefix + key
      if isinstance(value, dict):
        fill(node[key], value, name + ".")
        continue
      if name not in schema and not _model_specific(name):
        raise _unknown_key_error(name, "in the saved config")
      if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      with node.ignore_type():
        node[key] = value

  fill(config, raw, "")
  return config


def check_variant(arg: str | None, variants: tuple[str, ...], experiment: str) -> None:
  """An experiment's `get_config(arg)` accepts only the variants it defines."""
  if arg is not None and arg not in variants:
    raise ConfigError(f"Experiment {experiment!r} has no variant {arg!r}; use one of {', '.join(variants)} or none.")
