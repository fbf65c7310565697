"""SIGTERM/SIGINT within a bounded time, wherever a single-process run is.

- setup (building, restoring, compiling): nothing new to save, so the process exits at once, even while
  the main thread is busy inside XLA (a watcher thread sees the signal through `signal.set_wakeup_fd`);
- training: the loop saves the step it reached and exits (bound: one step plus the save);
- evaluation: the evaluation is abandoned at the next batch and the step reached is saved.
A second signal always exits at once (finished checkpoints stay: a half-written step is never visible).
With several processes jax's preemption sync point owns SIGTERM, so that all processes save the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

SETUP, TRAIN, EVAL = "setup", "train", "eval"


class Abandoned(Exception):
  """Raised inside an evaluation that a stop signal cut short."""


class Stop:
  """Catches SIGTERM/SIGINT while installed; `phase` says what a signal does now."""

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.phase = SETUP
    self.signum: int | None = None
    self.setup_note = "nothing new to save"  # The line printed when a signal ends setup.
    self._on_exit: list[Callable[[], None]] = []
    self._handlers: dict[int, Any] = {}
    self._pipe: tuple[int, int] | None = None
    self._old_wakeup = -1

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def at_exit(self, fn: Callable[[], None]) -> None:
    """Runs `fn` (e.g. releasing the workdir lock) before an immediate exit."""
    self._on_exit.append(fn)

  def check(self) -> None:
    """Raises `Abandoned` in an evaluation once a signal arrived."""
    if self.signum is not None:
      raise Abandoned(self.name)

  def __enter__(self):
    if not self.enabled:
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._handlers[sig] = signal.signal(sig, self._on_signal)
    r, w = os.pipe()
    os.set_blocking(w, False)
    self._pipe = (r, w)
    self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(r,), name="jaxcollab-stop", daemon=True).start()
    return self

  def __exit__(self, *exc) -> None:
    if not self.enabled or self._pipe is None:
      return
    signal.set_wakeup_fd(self._old_wakeup)
    for sig, handler in self._handlers.items():
      signal.signal(sig, handler)
    self._handlers = {}
    r, w = self._pipe
    self._pipe = None
    os.close(w)  # The watcher reads EOF and ends.
    del r

  def _on_signal(self, signum, frame) -> None:
    del frame  # The main thread's view; the watcher already acted on it.
    if self.signum is None:
      self.signum = signum

  def _watch(self, r: int) -> None:
    seen = 0
    while True:
      try:
        data = os.read(r, 64)
      except OSError:
        break
      if not data:
        break
      for signum in data:
        if signum not in (signal.SIGTERM, signal.SIGINT):
          continue
        seen += 1
        if self.signum is None:
          self.signum = signum
        if self.phase == SETUP or seen > 1:
          self._exit_now(signum, second=seen > 1)
    os.close(r)

  def _exit_now(self, signum: int, second: bool) -> None:
    name = signal.Signals(signum).name
    if second:
      line = (
        f"Stopped by a second {name}: exiting at once; finished checkpoints are kept, run the same command to resume."
      )
    else:
      line = f"Stopped by {name} during setup ({self.setup_note}); run the same command to resume."
    for fn in self._on_exit:
      with contextlib.suppress(OSError, ValueError):  # Exiting anyway.
        fn()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(0 if not second else 128 + signum)  # pylint: disable=protected-access
