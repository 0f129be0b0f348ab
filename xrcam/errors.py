"""Exceptions that carry enough context for a user to find and fix the problem.

Every input problem names the file (and the frame, where there is one) so a batch run over a
whole archive can report it and carry on with the rest.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "XrcamError",
    "XrcamInputError",
    "XrcamCheckpointError",
    "XrcamConfigError",
    "XrcamLockError",
    "XrcamStorageError",
    "storage_error",
]


class XrcamError(Exception):
    """Base class of every error xrcam raises on purpose."""


class XrcamInputError(XrcamError):
    """A video, frame, image or mask that cannot be used.

    The message always starts with the file path, then the frame index if known, then the problem.
    """

    def __init__(self, path: str | Path, problem: str, frame: int | None = None):
        self.path = str(path)
        self.frame = frame
        self.problem = problem
        where = self.path if frame is None else f"{self.path} (frame {frame})"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray)
        return (type(self), (self.path, self.problem, self.frame))


class XrcamCheckpointError(XrcamError):
    """A checkpoint that is unsafe to load or does not fit the requested model."""


class XrcamConfigError(XrcamError):
    """Settings that contradict each other or an existing result store."""


class XrcamLockError(XrcamError):
    """Another live process holds the results folder (``xrcam.lock``); the message names it.

    ``holder`` is the lock file's record: host, pid, command, started.
    """

    def __init__(self, message: str, holder: dict | None = None):
        self.holder = dict(holder or {})
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.holder))


class XrcamStorageError(XrcamError):
    """A file-system problem with an output path (read-only, not a folder, no permission, disk full).

    The message is one sentence naming the path and what to do; build it with :func:`storage_error`.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


def storage_error(exc: OSError, path: str | Path | None = None) -> XrcamStorageError:
    """Turn an ``OSError`` from writing ``path`` into a sentence saying what went wrong and what to do."""
    import errno

    where = path if path is not None else (exc.filename or "?")
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        problem = "the disk is full (or over quota); free space and rerun the same command to resume"
    elif code == errno.EROFS:
        problem = "the file system is read-only; choose an output folder on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        problem = "permission denied; choose a folder you can write to or fix its permissions"
    elif code == errno.ENOTDIR:
        problem = "a part of this path is a file, not a folder; choose another output path"
    elif code == errno.EEXIST:
        problem = "exists and is not a folder; choose another output path"
    elif code == errno.EISDIR:
        problem = "is a folder where a file was expected; choose another output path"
    else:
        problem = f"cannot write ({exc.strerror or exc}); check the path and the disk"
    return XrcamStorageError(where, problem)
