"""jaxcollab: a JAX/Flax research codebase for teams that study models together."""

__version__ = "0.1.0"


def load(path: str, step: int | None = None):
  """Returns (model, variables, config) from a workdir, a checkpoint step directory or a bundle."""
  from jaxcollab import reload  # pylint: disable=g-import-not-at-top

  return reload.load(path, step=step)
