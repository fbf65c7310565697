"""The workdir contract: one writer at a time, only jaxcollab's own directories, no silent config change.

A workdir describes exactly how its checkpoints were made, so:
  - process 0 holds an exclusive lock file (`WORKDIR/.jaxcollab.lock`, with its host and pid) while it writes;
    a second writer is refused before it touches anything, and a lock left by a dead process is taken over;
  - a directory that is neither empty nor a jaxcollab workdir is refused unless asked for;
  - resuming compares the new config with the one the checkpoint was trained with: keys that change the
    computation are refused (or allowed one by one with `train.allow_changes`), the rest may change;
  - run.json keeps a history of segments: step ranges, config changes, command lines, hosts;
  - errors are one sentence on the terminal and full detail in `WORKDIR/jaxcollab.log`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

from jaxcollab import config as config_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import LOG_FILE, UserError, os_cause

LOCK_FILE = ".jaxcollab.lock"
RUN_FILE = "run.json"
# Keys that do not change what a step computes: they may differ between segments of one run.
# (`train.steps` with a warmup_cosine schedule does change the remaining learning rates: recorded.)
RESUMABLE_KEYS = (
  "train.steps",
  "train.eval_every",
  "train.log_every",
  "train.steps_per_call",
  "train.update_norm",  # A metric only: the same parameters with it on or off (tests/train_test.py).
  "train.eval_batch_size",
  "train.target",
  "train.allow_changes",
  "checkpoint.*",
  "mesh.*",
  "dataset.num_workers",
  "dataset.data_dir",
  "init_from",
  "model.remat",
)
_LOG = logging.getLogger("jaxcollab.workdir")
_DETAIL = logging.getLogger("jaxcollab.detail")  # Full tracebacks: the log file only, never the terminal.
_DETAIL.propagate = False
_DETAIL.addHandler(logging.NullHandler())  # Without a workdir open, detail goes nowhere (not to stderr).


def _console_filter(record: logging.LogRecord) -> bool:
  """The terminal gets jaxcollab's own lines; libraries' errors, tracebacks and warnings go to the log file.

  (orbax logs ~350 lines of tracebacks for one full disk; the error that follows says it in one sentence.)
  """
  if record.name in ("root", "__main__") or record.name.startswith("jaxcollab"):
    return True
  return record.name != "py.warnings" and record.levelno < logging.ERROR and record.exc_info is None


def quiet_terminal() -> None:
  """For the CLI's training: library errors, thread exceptions and finalizer noise go to the log file only."""
  for handler in logging.getLogger().handlers:
    if _console_filter not in handler.filters:
      handler.addFilter(_console_filter)
  logging.captureWarnings(True)  # e.g. jax's "Error writing persistent compilation cache entry" on a full disk.
  threading.excepthook = lambda args: _DETAIL.error(
    "In thread %s:", getattr(args.thread, "name", "?"), exc_info=args.exc_value or True
  )
  sys.unraisablehook = lambda u: _DETAIL.error(
    "Unraisable in %r: %s", u.object, u.err_msg or "", exc_info=u.exc_value or True
  )


class _QuietFileHandler(logging.FileHandler):
  """A log file that stays silent when it cannot be written (a full disk must not flood the terminal)."""

  def handleError(self, record: logging.LogRecord) -> None:
    del record

  def flush(self) -> None:
    with contextlib.suppress(OSError):
      super().flush()

  def close(self) -> None:
    with contextlib.suppress(OSError):
      super().close()


class WorkdirError(UserError):
  """The workdir cannot be used as asked: busy, not a directory, not writable, or not jaxcollab's."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_directory(path: str) -> None:
  """`path` must be a directory or be creatable as one; says which part is in the way otherwise."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is a file, not a directory; pass a directory (new or a jaxcollab workdir).")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"--workdir {path} lies under {parent}, which is a file; pass a path in a directory.")


def _our_checkpoints(path: str) -> bool:
  """A checkpoints/ directory holding only what jaxcollab's Checkpointer writes there (or nothing yet)."""
  try:
    names = os.listdir(os.path.join(path, "checkpoints"))
  except OSError:
    return False
  return all(n.split(".")[0].isdigit() or n == ".deleted" for n in names)


def is_workdir(path: str) -> bool:
  """True for a directory that jaxcollab trained into (or started to)."""
  if os.path.exists(os.path.join(path, LOCK_FILE)) or _our_checkpoints(path):
    return True
  try:
    with open(os.path.join(path, RUN_FILE)) as f:
      return "jaxcollab" in json.load(f).get("versions", {})
  except (OSError, ValueError, AttributeError):
    return False


def check_owned(path: str, use_nonempty: bool = False) -> None:
  """Refuses a directory that holds other files and was not written by jaxcollab, unless asked for."""
  if use_nonempty or not os.path.isdir(path) or not os.listdir(path) or is_workdir(path):
    return
  names = sorted(os.listdir(path))
  shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
  raise WorkdirError(
    f"--workdir {path} is not empty ({shown}) and is not a jaxcollab workdir; pass a new or empty "
    "directory, or add --use_nonempty_workdir to write into it (its config.json, metrics.jsonl, "
    "report.json and tensorboard/ files would be replaced)."
  )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """An exclusive `flock` on WORKDIR/.jaxcollab.lock; the file names the holder while it is held."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def _holder(self, fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
      return json.loads(os.read(fd, 65536).decode() or "{}")
    except ValueError:
      return {}

  def acquire(self) -> str | None:
    """Takes the lock; returns a notice when it took over one left by a process that died."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(
        f"Cannot write to workdir {self.workdir} ({os_cause(e)}); make it writable or pass another "
        "--workdir (`jaxcollab eval` and `inspect` read a workdir without writing)."
      ) from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise WorkdirError(
        f"Workdir {self.workdir} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(since {holder.get('since', '?')}); wait for that run to finish or stop it, or pass another --workdir."
      ) from None
    except OSError:  # A filesystem without locks: fall back to the holder's pid on this host.
      holder = self._holder(fd)
      if holder.get("host") == socket.gethostname() and _pid_alive(int(holder.get("pid", 0))):
        os.close(fd)
        raise WorkdirError(
          f"Workdir {self.workdir} is in use by pid {holder['pid']} on this host; wait for it to "
          "finish or stop it, or pass another --workdir."
        ) from None
    previous = self._holder(fd)
    self._fd = fd
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    if previous.get("pid"):
      return (
        f"Took over the lock of workdir {self.workdir} left by pid {previous['pid']} on host "
        f"{previous.get('host', '?')} (since {previous.get('since', '?')}), which is no longer running."
      )
    return None

  def release(self) -> None:
    """Empties the file (a clean exit leaves no holder) and unlocks it; safe to call twice."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass
    finally:
      os.close(fd)  # Closing the descriptor drops the flock.


# ---- Config on resume ----------------------------------------------------------------------------


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _resumable(key: str, allowed: tuple[str, ...]) -> bool:
  return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in (*RESUMABLE_KEYS, *allowed))


def parse_allow_changes(text: str, config: ConfigDict | None = None) -> tuple[str, ...]:
  """'a.b, c' -> ('a.b', 'c'), each a key of the schema or of `config` (its model's fields), or SECTION.*."""
  keys = tuple(k.strip() for k in text.split(",") if k.strip())
  valid = set(_flat(config_lib.defaults().to_dict())) | set(_flat(config.to_dict() if config is not None else {}))
  for key in keys:
    if key not in valid and not (key.endswith(".*") and any(v.startswith(key[:-1]) for v in valid)):
      raise UserError(
        f"train.allow_changes names {key!r}, which is not a config key; list keys such as "
        "optimizer.learning_rate, separated by commas."
      )
  return keys


def _show(value: Any) -> str:
  return json.dumps(value) if isinstance(value, str) else str(value).replace(" ", "")


def config_changes(saved: dict[str, Any], config: ConfigDict) -> dict[str, list[Any]]:
  """key -> [saved value, new value] for every key both configs have whose value differs (in JSON form).

  A key only one side has cannot change a computation: one the schema gained since the save keeps the
  old behaviour at its default, and one of another model's fields (or since removed) is read by nobody.
  """
  old = _flat(saved)
  new = _flat(json.loads(config_lib.to_json(config)))
  return {k: [old[k], new[k]] for k in sorted(set(old) & set(new)) if old[k] != new[k]}


def check_resume(
  saved: dict[str, Any], config: ConfigDict, step: int, workdir: str, portable: tuple[str, ...] = ()
) -> dict[str, list[Any]]:
  """The allowed changes against the checkpoint's config; raises naming every key that may not change.

  `portable`: the model's keys that change speed, not results (an attention kernel), also allowed.
  """
  changes = config_changes(saved, config)
  allowed = (*parse_allow_changes(config.train.allow_changes, config), *portable)
  refused = {k: v for k, v in changes.items() if not _resumable(k, allowed)}
  if refused:
    listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
    raise WorkdirError(
      f"Resuming {workdir} from step {step} would change how its checkpoints were computed ({listed}); rerun "
      "with the values it was trained with, pass a new --workdir, or allow it deliberately with "
      f"--config.train.allow_changes={','.join(refused)}."
    )
  return changes


# ---- The open workdir --------------------------------------------------------------------------


class Workdir:
  """One writer's session on a workdir: lock, detail log and run.json segment; process 0 only writes."""

  def __init__(self, path: str, *, writer: bool = True, use_nonempty: bool = False):
    self.path, self.writer, self.use_nonempty = path, writer, use_nonempty
    self.lock = Lock(path)
    self._handler: logging.Handler | None = None
    self._segments: list[dict[str, Any]] = []
    self.segment: dict[str, Any] | None = None
    self.changes: dict[str, list[Any]] = {}

  def open(self) -> Workdir:
    """Checks and locks the directory (process 0) before anything is written into it."""
    check_directory(self.path)
    if not self.writer:
      return self
    check_owned(self.path, self.use_nonempty)
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"Cannot create workdir {self.path} ({os_cause(e)}); pass a path you can write to.") from e
    notice = self.lock.acquire()
    self._segments = list(read_run_info(self.path).get("segments", []))
    try:
      self._handler = _QuietFileHandler(os.path.join(self.path, LOG_FILE))
    except OSError as e:
      self.lock.release()
      raise WorkdirError(f"Cannot write {LOG_FILE} in workdir {self.path} ({os_cause(e)}); make it writable.") from e
    self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(self._handler)
    _DETAIL.addHandler(self._handler)
    _DETAIL.setLevel(logging.DEBUG)
    _DETAIL.info("Writing %s (pid %d on %s).", self.path, os.getpid(), socket.gethostname())
    if notice:
      _LOG.warning("%s", notice)
    return self

  def log_detail(self, e: BaseException) -> None:
    """The full traceback of `e` into the workdir's log file (the terminal shows one sentence)."""
    if self._handler is not None:
      _DETAIL.error("%s: %s", type(e).__name__, e, exc_info=e)
      self._handler.flush()

  def begin_segment(self, start: int, argv: list[str], changes: dict[str, list[Any]], **info: Any) -> None:
    """Appends this run's segment to run.json (after metrics.write_run_info rewrote the rest)."""
    self.changes = changes
    self.segment = {
      "start_step": start,
      "end_step": start,
      "status": "running",
      "start_time": _now(),
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "command": " ".join(argv),
      "config_changes": changes,
      **info,
    }
    self._write_segments()

  def end_segment(self, step: int | None, status: str) -> None:
    """Records where (default: the last step counted) and how this segment ended: finished, stopped, failed."""
    if self.segment is None:
      return
    self.segment.update(end_step=self.segment["end_step"] if step is None else step, status=status, end_time=_now())
    self._write_segments()

  def _write_segments(self) -> None:
    if not self.writer:
      return
    info = read_run_info(self.path)
    info["segments"] = [*self._segments, self.segment]
    tmp = os.path.join(self.path, RUN_FILE + ".tmp")
    with open(tmp, "w") as f:
      f.write(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, os.path.join(self.path, RUN_FILE))

  def close(self) -> None:
    """Releases the lock and the log file; safe to call twice and from a signal-watching thread."""
    if self._handler is not None:
      logging.getLogger().removeHandler(self._handler)
      _DETAIL.removeHandler(self._handler)
      self._handler.close()
      self._handler = None
    self.lock.release()


def read_run_info(path: str) -> dict[str, Any]:
  """WORKDIR/run.json as a dict ({} if missing or unreadable)."""
  try:
    with open(os.path.join(path, RUN_FILE)) as f:
      info = json.load(f)
    return info if isinstance(info, dict) else {}
  except (OSError, ValueError):
    return {}


def write_config(path: str, config_json: str) -> None:
  """WORKDIR/config.json, replaced in one step and only when it changes (a finished run stays untouched)."""
  file = os.path.join(path, "config.json")
  try:
    with open(file) as f:
      if f.read() == config_json:
        return
  except OSError:
    pass
  with open(file + ".tmp", "w") as f:
    f.write(config_json)
  os.replace(file + ".tmp", file)
