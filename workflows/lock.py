"""One writer per results folder: an exclusive lock file ``RESULTS/xrcam.lock``.

The file is created atomically (written aside, then hard-linked into place, which fails when it
exists) and holds JSON: host, pid, command and start time of the holder. A second ``run`` or
``reduce`` into the same folder is refused at once with a sentence naming the holder. A lock left by
a process that no longer exists on this host (a SIGKILLed driver) is stale and is taken over; a lock
held from another host cannot be checked and is reported with the command to remove it.

Example::

    with results_lock(Path("results"), "run"):
        ...  # the only writer of results/
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xrcam.errors import XrcamLockError, XrcamStorageError, storage_error

__all__ = ["LOCK_NAME", "results_lock", "read_lock"]

LOCK_NAME = "xrcam.lock"


def read_lock(out: str | Path) -> dict[str, Any] | None:
    """The record in ``out/xrcam.lock``, ``{}`` when unreadable, or ``None`` when there is no lock."""
    path = Path(out) / LOCK_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(holder: dict[str, Any]) -> bool:
    """Whether the holder is a process of this host that no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"xrcam {holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')})"
    )


@contextlib.contextmanager
def results_lock(out: str | Path, command: str) -> Iterator[Path]:
    """Hold the exclusive lock of results folder ``out`` (created if needed) while ``command`` runs.

    Raises :class:`xrcam.errors.XrcamLockError` naming the holder when another live process holds
    it, :class:`xrcam.errors.XrcamStorageError` when the folder cannot be created or written.
    """
    out = Path(out)
    path = out / LOCK_NAME
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise XrcamStorageError(out, "exists and is not a folder; choose another output path") from exc
    except OSError as exc:
        raise storage_error(exc, out) from exc
    aside = out / f".{LOCK_NAME}.{record['host']}.{record['pid']}"
    try:
        aside.write_text(json.dumps(record))
    except OSError as exc:
        raise storage_error(exc, out) from exc
    try:
        for _ in range(3):
            try:
                os.link(aside, path)
                break
            except FileExistsError:
                holder = read_lock(out)
                if holder is None:
                    continue  # released meanwhile
                if not holder:  # being written by its holder right now, or damaged
                    time.sleep(0.2)
                    holder = read_lock(out)
                if holder is None:
                    continue
                if holder and _stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                raise XrcamLockError(
                    f"{out} is in use by {_describe(holder) if holder else 'another xrcam command'}; "
                    f"wait for it to finish, or if it is gone, delete {path}",
                    holder,
                ) from None
            except OSError as exc:
                raise storage_error(exc, out) from exc
        else:
            raise XrcamLockError(f"{out}: could not take the lock {path}; retry", read_lock(out))
    finally:
        with contextlib.suppress(OSError):
            aside.unlink()
    try:
        yield path
    finally:
        if read_lock(out) == record:
            with contextlib.suppress(OSError):
                path.unlink()
