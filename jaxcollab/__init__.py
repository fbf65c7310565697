"""jaxcollab: a JAX/Flax research codebase for teams that study models together."""

__version__ = "0.1.0"

# The functions below import lazily so that `import jaxcollab` stays cheap and sets up no jax
# backend; loading a bundle then imports neither orbax nor the training code.


def load(path: str, step: int | None = None):
  """Returns (model, variables, config) from a workdir, a checkpoint step directory or a bundle."""
  from jaxcollab import bundle  # pylint: disable=g-import-not-at-top

  loaded = bundle.load_any(path, step)
  return loaded.model, loaded.variables, loaded.config


def sample(path: str, prompt, *, step: int | None = None, **options) -> list[str]:
  """Text continuations of `prompt` from a GPT workdir or bundle; options as `infer.sample`."""
  from jaxcollab import bundle, infer  # pylint: disable=g-import-not-at-top

  loaded = bundle.load_any(path, step)
  return infer.sample(loaded.model, loaded.variables, loaded.config, prompt, **options)


def predict(path: str, inputs, *, step: int | None = None, **options) -> list[dict]:
  """Top classes for image files or arrays from a classifier workdir or bundle; options as `infer.predict`."""
  from jaxcollab import bundle, infer  # pylint: disable=g-import-not-at-top

  loaded = bundle.load_any(path, step)
  return infer.predict(loaded.model, loaded.variables, loaded.config, loaded.dataset, inputs, **options)
