"""No leftovers: the processes of a local Ray die with the command that started them, even a SIGKILLed one.

Ray ties its GCS server and raylet to the driver, but the agents the raylet starts (dashboard agent,
runtime-env agent) and idle workers outlive a driver killed with SIGKILL. :func:`orphan_guard` marks
every process of the Ray it is about to start with an environment variable holding a per-run token
(child processes inherit it) and starts a tiny watchdog in its own session that waits for the driver
to exit and then kills exactly the processes carrying that token: never another user's Ray, never
a Ray this command joined.

The watchdog is this module run as a script: ``python -m workflows.ray_guard DRIVER_PID TOKEN``.
Linux only (it reads ``/proc``); elsewhere the guard does nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

__all__ = ["MARKER_ENVVAR", "orphan_guard", "marked_processes", "kill_marked"]

MARKER_ENVVAR = "XRCAM_RAY_OWNER"
_PROC = "/proc"


def marked_processes(token: str) -> list[int]:
    """Pids of the processes whose (initial) environment carries ``XRCAM_RAY_OWNER=token``."""
    needle = f"{MARKER_ENVVAR}={token}".encode()
    found = []
    try:
        names = os.listdir(_PROC)
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"{_PROC}/{name}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(name))
    return found


def kill_marked(token: str, rounds: int = 3, pause: float = 0.5) -> int:
    """SIGKILL every process marked with ``token`` (a few rounds: a dying raylet may still spawn)."""
    killed = 0
    for round_ in range(rounds):
        pids = marked_processes(token)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        if not pids and round_:
            break
        time.sleep(pause)
    return killed


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` has exited (a zombie counts as exited)."""
    try:
        import select

        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)
        return
    while True:
        try:
            with open(f"{_PROC}/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.5)


@contextlib.contextmanager
def orphan_guard(enabled: bool = True) -> Iterator[str | None]:
    """Mark the processes started inside the ``with`` and kill them if this process dies.

    Use it around the start of a *local* Ray only (``enabled=False`` makes it a no-op, e.g. when
    joining a cluster). On a normal exit any marked process still alive is killed too, after Ray's
    own shutdown. Yields the token (``None`` when disabled).
    """
    if not enabled or not os.path.isdir(_PROC):
        yield None
        return
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENVVAR}
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "workflows.ray_guard", str(os.getpid()), token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C or SIGKILL of our process group leaves it running
        close_fds=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    previous = os.environ.get(MARKER_ENVVAR)
    os.environ[MARKER_ENVVAR] = token
    try:
        yield token
    finally:
        if previous is None:
            os.environ.pop(MARKER_ENVVAR, None)
        else:
            os.environ[MARKER_ENVVAR] = previous
        watchdog.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=5)
        kill_marked(token, rounds=2, pause=0.2)


def main(argv: list[str]) -> int:
    pid, token = int(argv[0]), argv[1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the driver ended normally and says so
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_exit(pid)
    kill_marked(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
