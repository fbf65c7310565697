"""Every exception type jaxcollab raises on purpose; the bottom layer, importing nothing of the package.

A `UserError` is a mistake in what the user asked for (a config key, a path, a checkpoint, a workdir):
its message is one sentence naming the problem and the fix, and the CLI prints it and exits 2.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake in what the user asked for; the CLI prints it as one sentence and exits 2."""


class ConfigError(UserError):
  """A config key, type or value that cannot work."""


class CheckpointError(UserError):
  """A checkpoint is missing, does not fit the model, or could not be restored; finished steps stay untouched."""


class CorruptCheckpointError(CheckpointError):
  """A finished step whose files are damaged (checksum, size or unreadable metadata); fallback may skip it."""


class NonFiniteLossError(UserError):
  """The loss became NaN or Inf; training stops and the finished checkpoints stay as they are."""


class BundleError(UserError):
  """An exported bundle is missing a file, is damaged, or does not fit its config."""
