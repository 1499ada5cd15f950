"""One writer per output: `NAME.lock` next to the domain UNet while a run writes it.

Two runs saving under one name would interleave checkpoints and resume states of different runs.
The lock file is created exclusively (O_EXCL) and holds the owner's pid, host and start time. A lock
whose owner is gone (the run was killed with SIGKILL, the machine rebooted) is stale: the next run
on the same host removes it and says so. A lock from another host is never broken automatically
(its pid means nothing here); the message says how to remove it. Re-entrant within one process.

Also: `remove_partials` deletes temp folders a killed writer left (`.NAME.XXXXXXXX.partial/`, see
guidance.checkpoint.save_safetensors_atomic); only the lock holder calls it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from .data import TrainingInputError

log = logging.getLogger("indomain.training")

LOCK_SUFFIX = ".lock"
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def lock_path_for(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + LOCK_SUFFIX)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class OutputLock:
    """`with OutputLock(out_path):` — refuses (TrainingInputError) while another live run holds it."""

    def __init__(self, out_path):
        self.out_path = Path(out_path)
        self.path = lock_path_for(self.out_path)
        self.key = str(self.path.resolve())

    def acquire(self) -> "OutputLock":
        with _held_guard:
            if self.key in _held:  # this process already holds it (the CLI takes it early, the trainer again)
                _held[self.key] += 1
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "output": self.out_path.name}
            for _attempt in range(3):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    if self._break_if_stale():
                        continue
                    raise self._busy_error() from None
                except OSError as e:
                    raise TrainingInputError(f"cannot create the lock {self.path}: {e.strerror or e}. "
                                             "Choose a writable output folder.") from None
                with os.fdopen(fd, "w") as f:
                    json.dump(owner, f)
                _held[self.key] = 1
                return self
            raise self._busy_error()

    def _break_if_stale(self) -> bool:
        info = _read(self.path)
        if not info:  # being written this instant, or garbage: garbage older than a minute is stale
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            if age < 60:
                return False
        elif info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1))):
            return False
        log.warning("InDomain training: removing the stale lock %s (its run, pid %s, is gone: killed or crashed)",
                    self.path, info.get("pid", "?"))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        return True

    def _busy_error(self) -> TrainingInputError:
        info = _read(self.path)
        who = (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}" if info
               else "owner unknown")
        return TrainingInputError(
            f"another training run is writing {self.out_path.name} ({who}; lock file {self.path}). Wait for it to "
            "finish, or choose another save name. If you are sure no run is writing it (e.g. it ran on another "
            f"machine that crashed), delete {self.path.name}.")

    def release(self) -> None:
        with _held_guard:
            count = _held.get(self.key, 0)
            if count > 1:
                _held[self.key] = count - 1
                return
            _held.pop(self.key, None)
            if count and _read(self.path).get("pid") == os.getpid():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def remove_partials(out_path) -> list[Path]:
    """Delete temp files a killed writer of this output left behind: of the model and its resume state
    (`.NAME.XXXXXXXX.partial/`), of the loss curve (`.NAME.loss.png.XXXXXXXX.partial`) and of the previews
    (`NAME.previews/.*.partial`)."""
    out_path = Path(out_path)
    removed = []
    stem = out_path.stem
    candidates = [*out_path.parent.glob(f".{stem}.????????.partial"),  # mkdtemp / mkstemp add 8 characters
                  *out_path.parent.glob(f".{stem}.loss.png.????????.partial"),
                  *(out_path.parent / f"{stem}.previews").glob(".*.png.????????.partial")]
    for p in candidates:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    if removed:
        log.warning("InDomain training: removed %d temp file(s) left by an interrupted save of %s", len(removed),
                    out_path.name)
    return removed
