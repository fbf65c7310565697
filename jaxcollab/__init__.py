"""jaxcollab: a JAX/Flax research codebase for teams that study models together.

`import jaxcollab` is cheap: the names below load their modules on first use, so the CLI can
check a config before jax starts and `jaxcollab.load` never imports the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {"configure": "jaxcollab.runtime"}
__all__ = ["__version__", "load", "predict", "sample", *_API]


def _open(path: str, step: int | None):
  from jaxcollab import bundle  # pylint: disable=g-import-not-at-top

  if bundle.is_bundle(path):  # Before reload is imported: a bundle needs no orbax.
    return bundle.read(path, step)
  from jaxcollab import reload  # pylint: disable=g-import-not-at-top

  return reload.open_model(path, step)


def load(path: str, step: int | None = None) -> tuple[Any, dict[str, Any], Any]:
  """(model, variables, config) from a workdir, a checkpoint step directory or an exported bundle."""
  loaded = _open(path, step)
  return loaded.model, loaded.variables, loaded.config


def sample(path: str, prompt: str | list[str], *, step: int | None = None, **options: Any) -> list[str]:
  """Continuations of `prompt` from a GPT workdir or bundle; `options` as `jaxcollab.infer.sample`."""
  from jaxcollab import infer  # pylint: disable=g-import-not-at-top

  return infer.sample(_open(path, step), prompt, **options)


def predict(path: str, inputs: list[Any], *, step: int | None = None, **options: Any) -> list[dict[str, Any]]:
  """Top classes of image files or arrays from a classifier workdir or bundle; `options` as `infer.predict`."""
  from jaxcollab import infer  # pylint: disable=g-import-not-at-top

  return infer.predict(_open(path, step), inputs, **options)


def __getattr__(name: str) -> Any:
  # PEP 562 lazy attributes: importing the module here, on first use, is the point.
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'jaxcollab' has no attribute {name!r}")
