"""Every exception type jaxcollab raises on purpose; the bottom layer, importing nothing of the package.

A `UserError` is a mistake in what the user asked for (a config key, a path, a checkpoint, a workdir):
its message is one sentence naming the problem and the fix, and the CLI prints it and exits 2.
"""

from __future__ import annotations

import errno
import os
import re


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


# Where a workdir keeps the full detail of every error (tracebacks, library logs); the terminal gets one sentence.
LOG_FILE = "jaxcollab.log"
_CAUSES = {
  errno.ENOSPC: "the disk is full",
  errno.EFBIG: "a file size limit was reached",
  errno.EDQUOT: "the disk quota is exceeded",
  errno.EACCES: "permission denied",
  errno.EPERM: "permission denied",
  errno.EROFS: "the filesystem is read-only",
}


def os_cause(e: BaseException) -> str:
  """A short cause for an OS-level failure, also when a library (orbax, tensorstore) wrapped it in its own."""
  code = getattr(e, "errno", None)
  if code is None:
    match = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(match.group(1)) if match else None
  if code in _CAUSES:
    return _CAUSES[code]
  if code:
    return os.strerror(code)
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__
