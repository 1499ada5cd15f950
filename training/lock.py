"""One writer per output: `NAME.lock` next to the domain UNet while a run (training or Extract Domain LoRA)
writes it.

Two runs saving under one name would interleave checkpoints and resume states of different runs. The lock
is the operating system's: an exclusive, non-blocking lock on the open file `NAME.lock` (`fcntl.flock` on
Linux/macOS, `msvcrt.locking` on Windows). The kernel gives it to exactly one process and releases it when
that process ends in any way (exit, crash, kill -9, reboot), so there is no stale-lock guessing from pids or
host names. The file holds the holder's pid, host and start time, for the message a refused run shows.
On release the holder deletes the file (POSIX; a taker re-checks after locking that the path still names the
file it locked, so a deletion racing with a new run cannot leave two holders). After a kill -9 the file stays
behind, unlocked: the next run simply takes it. Re-entrant within one process (the command line takes it
early, the trainer again).

Also: `remove_partials` deletes temp folders a killed writer left (`.NAME.XXXXXXXX.partial/`, see
guidance.checkpoint.save_safetensors_atomic); only the lock holder calls it.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from .data import TrainingInputError

log = logging.getLogger("indomain.training")

LOCK_SUFFIX = ".lock"
_held: dict[str, list] = {}   # resolved lock path -> [count, fd] of the locks this process holds
_held_guard = threading.Lock()


def lock_path_for(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + LOCK_SUFFIX)


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # byte 0; released by the system when the process ends
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass

    DELETE_ON_RELEASE = False  # an open file cannot be deleted on Windows; the unlocked file is harmless
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (BlockingIOError, PermissionError):
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    DELETE_ON_RELEASE = True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder may have deleted it meanwhile)."""
    if not DELETE_ON_RELEASE:
        return True
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class OutputLock:
    """`with OutputLock(out_path):` — refuses (TrainingInputError) while another process holds it."""

    def __init__(self, out_path):
        self.out_path = Path(out_path)
        self.path = lock_path_for(self.out_path)
        self.key = str(self.path.resolve())

    def acquire(self) -> "OutputLock":
        with _held_guard:
            if self.key in _held:  # this process already holds it (the CLI takes it early, the trainer again)
                _held[self.key][0] += 1
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _attempt in range(20):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
                except OSError as e:
                    raise TrainingInputError(f"cannot create the lock {self.path}: {e.strerror or e}. "
                                             "Choose a writable output folder.") from None
                try:
                    locked = _try_lock(fd)
                except OSError as e:  # e.g. a network file system without lock support
                    os.close(fd)
                    raise TrainingInputError(f"cannot lock {self.path}: {e.strerror or e}. Choose an output folder "
                                             "on a file system that supports file locks (a local disk).") from None
                if not locked:
                    os.close(fd)
                    raise self._busy_error()
                if not _same_file(fd, self.path):  # the previous holder deleted it as we opened it: take a new one
                    os.close(fd)
                    continue
                self._write_owner(fd)
                _held[self.key] = [1, fd]
                return self
            raise self._busy_error()

    def _write_owner(self, fd: int) -> None:
        previous = _read(self.path)
        if previous:  # left by a run that ended without releasing (kill -9, crash): the system released it
            log.warning("InDomain training: taking over the stale lock %s (its run, pid %s on %s, ended without "
                        "releasing it: killed or crashed)", self.path, previous.get("pid", "?"), previous.get("host", "?"))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "output": self.out_path.name}
        data = json.dumps(owner).encode()
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.ftruncate(fd, len(data))

    def _busy_error(self) -> TrainingInputError:
        info = _read(self.path)
        who = (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}" if info
               else "owner unknown")
        return TrainingInputError(
            f"another training run is writing {self.out_path.name} ({who}; lock file {self.path}). Wait for it to "
            "finish, or choose another save name. The lock is released by the system when that run ends, "
            "however it ends.")

    def release(self) -> None:
        with _held_guard:
            entry = _held.get(self.key)
            if entry is None:
                return
            if entry[0] > 1:
                entry[0] -= 1
                return
            _held.pop(self.key, None)
            fd = entry[1]
            try:
                if DELETE_ON_RELEASE and _same_file(fd, self.path):
                    try:
                        self.path.unlink()  # while still locked: a taker that opened it re-checks and retries
                    except FileNotFoundError:
                        pass
                elif not DELETE_ON_RELEASE:  # Windows: the file stays; empty means "released properly"
                    os.ftruncate(fd, 0)
                _unlock(fd)
            finally:
                os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def remove_partials(out_path) -> list[Path]:
    """Delete temp files a killed writer of this output left behind: of the model and its resume state
    (`.NAME.XXXXXXXX.partial/`), of the loss curve (`.NAME.loss.png.XXXXXXXX.partial`) and of the previews
    (`NAME.previews/.*.partial`). The name is matched literally (glob characters such as `[` in it are escaped)."""
    out_path = Path(out_path)
    removed = []
    stem = glob.escape(out_path.stem)
    folder = glob.escape(str(out_path.parent))
    previews = glob.escape(str(out_path.parent / f"{out_path.stem}.previews"))
    candidates = [*glob.glob(os.path.join(folder, f".{stem}.????????.partial")),  # mkdtemp / mkstemp add 8 characters
                  *glob.glob(os.path.join(folder, f".{stem}.loss.png.????????.partial")),
                  *glob.glob(os.path.join(previews, ".*.png.????????.partial"))]
    for p in map(Path, candidates):
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
