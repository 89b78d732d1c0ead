"""Small file helpers: atomic, durable writes, checksums, and the refusal to overwrite.

Every file aekit writes goes to a temporary name in the same folder, is flushed to the disk
(``fsync``) and then renamed into place, and the folder's entry is flushed after the rename.
So a crash, ``kill -9`` or a power cut leaves the old file or the new one under the real
name, never a half-written or empty one (a rename alone is not enough after a power cut:
the rename can reach the disk before the file's data does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".aekit.lock"  # the lock file of a folder a process writes into (folder_lock)
# What aekit writes into the folders that atomic_folder replaces whole: images and figures,
# a model or run folder's files (ConvAutoencoder.save may replace an `aekit train` run), and
# what a killed write or training left. Anything else there is the user's: never replaced.
AEKIT_OUTPUTS = ("*.png", "*.json", "*.safetensors", "*.csv", "*.html", "*.onnx", f".*{TMP_SUFFIX}", LOCK_NAME)


# The errors that say "this folder cannot take this file": a full disk or quota, a
# read-only file system, no permission, a file too large for the file system, a failing disk.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG, errno.EIO})
_WRITE_FIXES = {
    errno.ENOSPC: "free some disk space or write somewhere else",
    errno.EDQUOT: "free some of your disk quota or write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "you may not write there; write somewhere else or fix the permissions",
    errno.EPERM: "you may not write there; write somewhere else or fix the permissions",
}


class WriteError(OSError):
    """A file aekit could not write (full disk, read-only folder...); the old file is intact."""

    def __init__(self, path: Path, cause: OSError):
        reason = cause.strerror or str(cause)
        fix = _WRITE_FIXES.get(cause.errno, "check the disk and write somewhere else")
        super().__init__(cause.errno, f"cannot write {path} ({reason}); {fix}. "
                                      f"Nothing was written under that name: any earlier {path.name} is intact")
        self.filename, self.cause = str(path), cause

    def __reduce__(self):
        # Rebuilt from (path, cause), so that a copy or pickle (scikit-learn's n_jobs sends
        # errors between processes) is this error again, not a TypeError.
        return type(self), (Path(self.filename), self.cause)

    def __str__(self) -> str:
        return self.strerror


class AlreadyExists(ValueError):
    """A writer refused to replace what is already there: ``overwrite=True`` replaces it."""


class NotReplaceable(ValueError):
    """A folder that even ``overwrite=True`` does not replace: it holds the user's own files,
    or the current folder is in it."""


class FolderBusy(ValueError):
    """Another process holds the folder's lock (:func:`folder_lock`)."""


def refuse_existing(*paths: str | os.PathLike | None, overwrite: bool, what: str = "", other: str = "",
                    error: type[AlreadyExists] = AlreadyExists) -> None:
    """The one refusal of every aekit writer: raise ``error`` (an :class:`AlreadyExists`)
    when any of ``paths`` exists, unless ``overwrite``. ``None`` entries are skipped.

    One line names what is there: ``P already exists``, or ``DIR already holds a, b`` for
    files of one folder (``DIR already holds {what} (a, b)`` with ``what``), then the fix:
    ``pass overwrite=True to replace it``, after ``other``, another way on (``"resume=True
    to continue it"``).
    """
    existing = [Path(p) for p in paths if p is not None and os.path.lexists(p)]
    if overwrite or not existing:
        return
    folders = {p.parent for p in existing}
    if len(existing) == 1 and not what:
        subject, it, place = f"{existing[0]} already exists", "it", "path"
    elif len(folders) == 1:
        names = ", ".join(p.name for p in existing)
        held = f"{what} ({names})" if what else names
        subject, it, place = f"{existing[0].parent} already holds {held}", "it" if what else "them", "folder"
    else:
        subject, it, place = f"{', '.join(map(str, existing))} already exist", "them", "path"
    ways = f"{other}, overwrite=True" if other else "overwrite=True"
    raise error(f"{subject}; pass {ways} to replace {it}, or choose another {place}")


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in WRITE_ERRNOS


def _beside(path: Path, make):
    """Create ``path``'s folder and a temporary beside it with ``make()``; a full disk, a
    read-only folder or a missing permission becomes :class:`WriteError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return make()
    except OSError as exc:
        if is_write_failure(exc):
            raise WriteError(path, exc) from None
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, from the kernel's cache to the disk."""
    folder = Path(path).is_dir()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if folder else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a folder (EINVAL); the file's own fsync still holds.
        if not (folder and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _durable_replace(source: Path, target: Path) -> None:
    """``os.replace(source, target)`` after ``source`` reached the disk, then flush the folder."""
    if source.is_dir():
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            fsync_path(file)
        for folder in sorted((p for p in source.rglob("*") if p.is_dir()), reverse=True):
            fsync_path(folder)
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)


def _new_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any error the temporary file is removed and ``path`` is left as it was. A full disk,
    a read-only folder or a missing permission raises :class:`WriteError`, which says so.
    """
    path = Path(path)
    tmp = _beside(path, lambda: _new_file(path))
    try:
        yield tmp
        # mkstemp makes 0600, and writers that recreate the file (safetensors) keep that:
        # give the file the usual permissions just before it takes the real name.
        os.chmod(tmp, 0o666 & ~_umask(tmp.parent))
        _durable_replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_write_failure(exc):
            raise WriteError(path, exc) from None
        raise


def make_folder(path: str | os.PathLike) -> None:
    """``mkdir -p path``, with :class:`WriteError` when the disk or folder refuses."""
    try:
        path = Path(path)
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            fsync_path(path.parent)  # the new folder's entry survives a power cut too
    except OSError as exc:
        if is_write_failure(exc):
            raise WriteError(Path(path), exc) from None
        raise


def remove_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete what an interrupted :func:`atomic_path` left of ``names`` in ``folder``.

    Only a process killed outright (``kill -9``, a power cut) leaves these behind.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


PROC_STATUS = "/proc/self/status"  # Linux (4.7 and later) shows the umask there: "Umask:\t0022"


def _umask(folder: Path) -> int:
    """The process's umask, read without setting it: ``os.umask`` can only read it by
    changing it, for the whole process, and a file another thread created meanwhile would
    get the wrong permissions. Where :data:`PROC_STATUS` does not say (macOS, BSD, old
    Linux), a probe folder made in ``folder`` with mode 0o777 shows what the umask takes
    away (default ACLs included), and is removed at once."""
    try:
        with open(PROC_STATUS, encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = Path(folder) / f".umask.{secrets.token_hex(8)}"  # mkdir fails rather than reuse a name
    os.mkdir(probe, 0o777)
    try:
        return 0o777 & ~probe.stat().st_mode
    finally:
        probe.rmdir()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """Checksum of an array's dtype, shape and bytes (C order)."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; swap it in for ``path`` on success.

    An existing ``path`` is replaced only once the new folder is complete (callers check
    with :func:`refuse_existing` first), and only a folder of aekit's outputs
    (:func:`check_replaceable`). On any error the temporary folder is removed.
    """
    path = Path(path)
    if path.is_dir():
        check_replaceable(path)
    staging = _beside(path, lambda: Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask(staging.parent))  # mkdtemp makes 0700: the usual permissions
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                _durable_replace(staging, path)
            except BaseException:
                os.replace(old / path.name, path)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            _durable_replace(staging, path)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_write_failure(exc):
            raise WriteError(path, exc) from None
        raise


def check_replaceable(folder: Path) -> None:
    """Refuse, with :class:`NotReplaceable`, to replace ``folder`` whole when that would
    take the current folder with it or delete files aekit did not write (:data:`AEKIT_OUTPUTS`;
    every subfolder counts as the user's), or while another process writes into it
    (:class:`FolderBusy`, :func:`folder_lock`)."""
    here, target = Path.cwd().resolve(), folder.resolve()
    if target == here or target in here.parents:
        where = "the current folder" if target == here else "a folder that holds the current folder"
        raise NotReplaceable(f"{folder} is {where}, which aekit would replace whole; name a new folder "
                             f"for the output (e.g. {folder / 'out'})")
    foreign = sorted(p.name + "/" if p.is_dir() else p.name for p in folder.iterdir()
                     if p.is_dir() or not any(fnmatch.fnmatchcase(p.name, kind) for kind in AEKIT_OUTPUTS))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise NotReplaceable(f"{folder} holds files aekit did not write ({', '.join(foreign[:3])}{more}), which "
                             "overwrite=True would delete with the folder; move them elsewhere, or choose another "
                             "folder")
    if (folder / LOCK_NAME).exists():
        with folder_lock(folder, "aekit"):  # refused while held; a killed holder's file goes
            pass


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, holder: str) -> Iterator[None]:
    """Hold ``folder``'s lock file (:data:`LOCK_NAME`) for the block, with ``holder`` (what,
    which process, since when) written in it; ``folder`` must exist.

    Another holder, in this process or another, gets :class:`FolderBusy` at once, naming
    the first: ``DIR: {holder} is writing into this folder``. The lock is
    ``flock``'s, which the kernel drops with the process however it ends (``kill -9`` too),
    so a lock file left behind blocks nothing. The file is removed on leaving.
    """
    path = Path(folder) / LOCK_NAME
    fd = _locked(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a waiter on this file then retries (_locked)
        os.close(fd)


def _locked(path: Path) -> int:
    """An open file descriptor of ``path`` holding its exclusive flock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if is_write_failure(exc):
                raise WriteError(path.parent, exc) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode("utf-8", "replace").strip() or "another aekit process"
            os.close(fd)
            raise FolderBusy(f"{path.parent}: {holder} is writing into this folder; wait for it to end, or "
                             "choose another folder") from None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                return fd
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder removed as it let go: lock the one there now
