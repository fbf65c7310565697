"""Exported bundles: a trained model in a directory that loads without orbax or the training code.

BUNDLE/model.safetensors  params (and batch_stats), keys are flattened paths ("params/block_0/ln1/scale")
BUNDLE/config.json        the resolved config, exactly as trained
BUNDLE/bundle.json        step, dataset description, eval metrics, versions and a SHA-256 of each file above
BUNDLE/README.md          the model card (written by `export`)

Reading one needs config, models and safetensors only: no orbax, no data pipeline, no training code.
`reload.load` and `jaxcollab.load` hand a bundle directory to `read`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import safetensors
import safetensors.numpy

from jaxcollab import config as config_lib
from jaxcollab import models
from jaxcollab.config import ConfigDict
from jaxcollab.errors import BundleError, UserError

PyTree = Any
FORMAT = "jaxcollab-bundle"
MANIFEST, WEIGHTS, CONFIG, CARD = "bundle.json", "model.safetensors", "config.json", "README.md"
CHECKED = (WEIGHTS, CONFIG)  # Files whose SHA-256 the manifest records.


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model ready to use, from a workdir step or a bundle."""

  model: nn.Module
  variables: dict[str, PyTree]  # {"params": ..., ["batch_stats": ...]}
  config: ConfigDict
  dataset: dict[str, Any]  # DatasetInfo fields: name, kind, image_shape, num_classes, vocab_size, seq_len, ...
  step: int
  meta: dict[str, Any]  # What the checkpoint (or bundle.json) says about the step: eval metrics, versions, ...


def is_bundle(path: str) -> bool:
  """A directory with bundle files and no checkpoints (a damaged bundle still counts, to say what is wrong)."""
  return (
    os.path.isdir(path)
    and not os.path.isdir(os.path.join(path, "checkpoints"))
    and any(os.path.exists(os.path.join(path, f)) for f in (MANIFEST, WEIGHTS))
  )


def _leaves(tree: PyTree) -> dict[str, Any]:
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flatten(tree: PyTree) -> dict[str, np.ndarray]:
  """{"params": {"Dense_0": {"kernel": x}}} -> {"params/Dense_0/kernel": x} as numpy."""
  return {name: np.asarray(leaf) for name, leaf in _leaves(tree).items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, PyTree]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def example_input(dataset: dict[str, Any]) -> np.ndarray:
  """A one-example model input of the dataset's shape: an image or a window of tokens."""
  if dataset["kind"] == "image":
    return np.zeros((1, *dataset["image_shape"]), np.float32)
  return np.zeros((1, dataset["seq_len"]), np.int32)


def build_model(config: ConfigDict, dataset: dict[str, Any]) -> nn.Module:
  # models.build reads num_classes / vocab_size off a DatasetInfo; a namespace avoids importing
  # jaxcollab.data, whose grain import pulls in orbax.
  fields = {"image_shape": None, "num_classes": None, "vocab_size": None, "seq_len": None, **dataset}
  return models.build(config, types.SimpleNamespace(**fields))


def write(out: str, loaded: Loaded, card: str, extra: dict[str, Any]) -> None:
  """Writes `loaded` as a bundle into the new (or empty) directory `out`."""
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out {out!r} already exists and is not an empty directory; choose a new path.")
  os.makedirs(out, exist_ok=True)
  safetensors.numpy.save_file(flatten(loaded.variables), os.path.join(out, WEIGHTS), metadata={"format": FORMAT})
  with open(os.path.join(out, CONFIG), "w") as f:
    f.write(config_lib.to_json(loaded.config))
  manifest = {
    "format": FORMAT,
    "format_version": 1,
    "step": loaded.step,
    "dataset": loaded.dataset,
    **extra,
    "sha256": {name: sha256(os.path.join(out, name)) for name in CHECKED},
  }
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  with open(os.path.join(out, CARD), "w") as f:
    f.write(card)


def read(path: str, step: int | None = None) -> Loaded:
  """The model of a bundle (which holds one step); every file is checked against the manifest before use."""
  where = f"Bundle {path!r}"
  again = "export it again with `jaxcollab export`"
  missing = [f for f in (MANIFEST, *CHECKED) if not os.path.isfile(os.path.join(path, f))]
  if missing:
    hint = (
      "; it looks like a Hugging Face export, which `transformers` loads"
      if not os.path.exists(os.path.join(path, MANIFEST)) and os.path.isfile(os.path.join(path, WEIGHTS))
      else ""
    )
    raise BundleError(f"{where} has no {' or '.join(missing)}{hint}; {again}.")
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      manifest = json.load(f)
    recorded = manifest["sha256"]
  except (ValueError, KeyError, TypeError) as e:
    raise BundleError(f"{where}: {MANIFEST} is damaged ({e}); {again}.") from e
  if manifest.get("format") != FORMAT:
    raise BundleError(f"{where}: {MANIFEST} is not a {FORMAT} manifest; {again}.")
  for name in CHECKED:
    if sha256(os.path.join(path, name)) != recorded.get(name):
      raise BundleError(f"{where}: {name} is damaged (its SHA-256 differs from {MANIFEST}); {again}.")
  with open(os.path.join(path, CONFIG)) as f:
    config = models.portable(models.resolve(config_lib.validate(config_lib.from_json(f.read())), drop_unread=True))
  variables = unflatten(safetensors.numpy.load_file(os.path.join(path, WEIGHTS)))
  dataset = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["dataset"].items()}
  model = build_model(config, dataset)
  check_fits(model, variables, dataset, where)
  if step is not None and step != manifest["step"]:
    raise UserError(f"{where} holds step {manifest['step']}, not step {step}; drop --step or export that step.")
  return Loaded(model, jax.device_put(variables), config, dataset, int(manifest["step"]), manifest)


def check_fits(model: nn.Module, variables: PyTree, dataset: dict[str, Any], where: str) -> None:
  """Raises BundleError unless `variables` has exactly the paths and shapes the model initialises."""
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), example_input(dataset), train=False)))
  expected = {k: tuple(v.shape) for k, v in _leaves(shapes).items()}
  got = {k: tuple(np.shape(v)) for k, v in _leaves(variables).items()}
  wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
  if wrong:
    raise BundleError(
      f"{where}: the weights do not fit the model its config.json describes ({len(wrong)} arrays "
      f"differ, e.g. {wrong[0]}: {got.get(wrong[0])} vs {expected.get(wrong[0])}); export it again."
    )
