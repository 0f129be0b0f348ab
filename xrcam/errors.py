"""Exceptions that carry enough context for a user to find and fix the problem.

Every input problem names the file (and the frame, where there is one) so a batch run over a
whole archive can report it and carry on with the rest.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["XrcamError", "XrcamInputError", "XrcamCheckpointError", "XrcamConfigError"]


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
