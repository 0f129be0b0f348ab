"""One writer per results folder: workflows.lock.results_lock (live holder refused, stale lock taken over)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workflows.lock import LOCK_NAME, read_lock, results_lock
from xrcam.errors import XrcamError, XrcamLockError, XrcamStorageError


def test_lock_records_the_holder_and_is_released(tmp_path):
    out = tmp_path / "results"
    with results_lock(out, "run") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "run" and holder["started"]
        with pytest.raises(XrcamLockError, match=rf"in use by xrcam run \(pid {os.getpid()}"):
            with results_lock(out, "reduce"):
                pass
        assert read_lock(out) == holder  # the refused second writer left the lock alone
    assert read_lock(out) is None
    assert [p.name for p in out.iterdir()] == []  # nothing left behind


@contextlib.contextmanager
def held_lock(out, command: str):
    """Another process holding the lock of ``out`` for ``command``; yields its pid."""
    code = textwrap.dedent(
        f"""
        import sys
        from workflows.lock import results_lock
        with results_lock({str(out)!r}, {command!r}):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.communicate("\n", timeout=60)


def test_a_live_holder_in_another_process_is_named(tmp_path):
    out = tmp_path / "results"
    with held_lock(out, "reduce") as pid:
        with pytest.raises(XrcamLockError) as err:
            with results_lock(out, "run"):
                pass
        assert f"pid {pid}" in str(err.value) and "xrcam reduce" in str(err.value)
        assert isinstance(err.value, XrcamError) and err.value.holder["pid"] == pid
    with results_lock(out, "run"):  # released by the holder: free again
        pass


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "run", "started": "x"})
    )
    with results_lock(out, "run") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / LOCK_NAME).write_text(
        json.dumps({"host": "node-elsewhere", "pid": 1, "command": "run", "started": "x"})
    )
    with pytest.raises(XrcamLockError, match=r"node-elsewhere.*delete .*xrcam\.lock"):
        with results_lock(out, "run"):
            pass


def test_out_below_a_file_is_a_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(XrcamStorageError, match=r"file.*not a folder"):
        with results_lock(tmp_path / "file" / "results", "run"):
            pass
