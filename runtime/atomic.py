"""Atomic writes: a folder or a small file appears complete at its final path, or not at all.

Shared by training checkpoints (modeling/checkpoint.py) and export packages (export/exporter.py).
Stdlib only: the runtime is the base layer both of them may import.

A folder is written in a staging folder beside its target, then published::

    tmp = staging_dir(target)        # .NAME.tmp-PID-XXXX, beside target, with the umask's modes
    ...write files into tmp...
    publish_dir(tmp, target)         # fsync every file, then tmp becomes target in one step

Publishing swaps the two folders in one atomic exchange where the OS offers it (Linux
renameat2), else renames the old target aside first; a kill at any moment leaves the old or
the new folder at `target`, and the other one in a hidden temporary folder that the next write
removes (`remove_stale_temporaries`: only folders whose writer process is gone).

A folder that one process writes over a long time (a training run) is locked for that time::

    with lock_dir(run_dir) as lock:   # FolderLocked(holder pid) if another live process holds it
        ...write into run_dir...

The lock is the kernel's (flock on POSIX, msvcrt.locking on Windows) on ``run_dir/.lock``,
which also names the holder's pid for the message. The kernel drops it the moment its holder
dies, however it dies: a lock left by a crash is free at once, and taking it over is the same
single atomic call as taking a free one, so two takers can never both win. (A pid file created
with O_EXCL would need a separate check-then-remove to take over a stale lock, and a recycled
pid would keep it "alive".)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import logging
import os
import re
import shutil
import sys
import tempfile
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# .NAME.tmp-PID-XXXX (a folder being written) and .NAME.old-PID-XXXX (a replaced one being removed)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^.]*$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a writer that may still own its temporary folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the umask's usual modes."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows commits writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (a rename into it) durable. Windows cannot open a folder: no-op."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file below `directory`, then every folder, deepest first."""
    folders = [directory]
    for path in directory.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fsync_file(path)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def replace_text(path: Path, text: str) -> None:
    """Atomically replace the small text file `path`: a temporary file beside it, fsync'ed,
    renamed over it, then the folder fsync'ed. Readers see the old text or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def staging_dir(target: Path) -> Path:
    """A new empty folder beside `target` named .NAME.tmp-PID-XXXX, with the umask's modes
    (a package or checkpoint is meant to be read by other users and services)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    make_readable(tmp)
    return tmp


def remove_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Delete the .NAME.tmp-PID-* / .NAME.old-PID-* folders (staging_dir, publish_dir) and files
    (replace_text) in `parent` left by writers that were killed (their process is gone); `name`
    may be a glob pattern ("step-*"). A live writer's temporaries are left alone. Returns what
    was removed."""
    removed = []
    for path in parent.glob(".*"):
        match = _TEMPORARY.match(path.name)
        if match is None or not fnmatch.fnmatchcase(match["name"], name) or pid_alive(int(match["pid"])):
            continue
        log.info("removing %s, left by an interrupted write", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE).
    False where the platform or file system cannot, and the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_dir(tmp: Path, target: Path) -> None:
    """Make the finished folder `tmp` (from `staging_dir(target)`) the folder at `target`.

    Every file is fsync'ed first. An existing `target` is replaced only now: in one atomic
    exchange where the OS offers it, else renamed aside (.NAME.old-PID-XXXX) just before `tmp`
    is renamed into place. The replaced folder is deleted afterwards."""
    fsync_tree(tmp)
    if target.exists():
        if exchange(tmp, target):
            fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
            return
        holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.replace(target, holder / target.name)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(holder, ignore_errors=True)
    else:
        os.replace(tmp, target)
        fsync_dir(target.parent)


LOCK_FILE = ".lock"


class FolderLocked(Exception):
    """Another live process holds the lock on `folder` (`holder`: its "pid on host", or "unknown")."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is locked by process {holder}")
        self.folder, self.holder = folder, holder


class FolderLock:
    """What `lock_dir` yields: the lock file, and the holder a crash left behind (None: none)."""

    def __init__(self, path: Path, fd: int, previous: str | None):
        self.path, self.fd, self.previous = path, fd, previous


def _try_lock(fd: int) -> bool:
    """Take the kernel's exclusive lock on the open file without waiting; False if it is held."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(path: Path) -> str:
    """The "pid on host" the holder wrote. A holder that has just taken the lock replaces the
    previous (dead) holder's line at once: wait a moment for a line naming a live process."""
    text = ""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace").strip() or text
        pid = text.split()[0] if text else ""
        if pid.isdigit() and (pid_alive(int(pid)) or not text.endswith(f" on {socket.gethostname()}")):
            return text  # alive here, or on another host (we cannot tell)
        time.sleep(0.05)
    return text or "unknown"


@contextlib.contextmanager
def lock_dir(folder: Path) -> Iterator[FolderLock]:
    """Hold an exclusive lock on the existing folder `folder` while the block runs; released
    (and `folder/.lock` removed) on any exit, exceptions included. Another live holder:
    FolderLocked naming it. A lock file whose holder died is taken over (logged)."""
    path = Path(folder) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        if not _try_lock(fd):
            os.close(fd)
            raise FolderLocked(Path(folder), _read_holder(path))
        try:  # the file we locked must still be the one at `path` (a releasing holder unlinks it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = os.read(fd, 200).decode("utf-8", "replace").strip() or None
        if previous:
            pid = previous.split()[0]
            log.warning("%s: taking over the lock of process %s, which is gone (it did not release it)", folder,
                        previous if not pid.isdigit() or not pid_alive(int(pid)) else f"{previous} (pid reused)")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    try:
        yield FolderLock(path, fd, previous)
    finally:
        if os.name == "nt":  # Windows cannot remove an open file: release, close, then remove
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
        else:  # removed while still locked: a process that opened the old file sees it is gone
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)


__all__ = [
    "FolderLock", "FolderLocked", "LOCK_FILE", "lock_dir", "exchange", "fsync_dir", "fsync_file", "fsync_tree",
    "make_readable", "pid_alive", "publish_dir", "remove_stale_temporaries", "replace_text", "staging_dir",
]
