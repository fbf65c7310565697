"""jaxcollab: a JAX/Flax research codebase for teams that study models together.

`import jaxcollab` is cheap: the names below load their modules on first use, so the CLI can
check a config before jax starts and `jaxcollab.load` never imports the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "configure": "jaxcollab.runtime",
    "load": "jaxcollab.reload",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
  # PEP 562 lazy attributes: importing the module here, on first use, is the point.
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'jaxcollab' has no attribute {name!r}")
