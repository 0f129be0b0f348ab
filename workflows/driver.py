"""The ``xrcam run`` driver: archive -> shards -> a pool of Ray worker actors -> one Zarr store.

The driver discovers the archive, creates every group and array of the store up front (from a small
per-video description a worker returns), then keeps each actor fed with a bounded number of shards.
Workers write their own chunks and return a manifest; the driver records the shard as done only after
that, so a rerun skips exactly the shards whose data is complete. A worker that dies (killed, lost node)
is replaced by a fresh actor and its shards are resubmitted; an error inside one video is recorded in
the failures table and the run carries on.

Before any of that, :func:`workflows.preflight.preflight` checks everything that can be checked without
starting (settings, model, weights, classes, archive, labels), and the run takes the results folder's
lock (:func:`workflows.lock.results_lock`), so a refused or concurrent run writes nothing. A worker that
dies while starting is replaced like one that dies mid-shard (up to :data:`MAX_START_FAILURES` times);
an error raised by its constructor is deterministic and aborts the run at once. A full disk stops the
run cleanly: what finished is recorded and a rerun resumes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workflows.lock import results_lock
from workflows.preflight import _split_entries, failure_row, preflight  # noqa: F401 (_split_entries: tests)
from workflows.settings import RunSettings
from workflows.store import ResultStore, VideoLayout, video_key
from workflows.worker import Shard, ShardWorker
from xrcam.errors import XrcamConfigError, XrcamError, XrcamStorageError, storage_error

__all__ = ["RunSummary", "plan_shards", "run", "FAILPOINT_ENVVAR"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a shard whose worker dies this many times is recorded as failed
MAX_START_FAILURES = 3  # workers that die while starting (killed, node lost) before the run gives up
IN_FLIGHT_PER_WORKER = 2  # one running, one queued at the actor, so a worker never waits for the driver
# Fault injection for the reliability tests: "kill-once:FILE" SIGKILLs the first worker that starts
# (FILE records that it happened), "raise" makes every worker's constructor fail.
FAILPOINT_ENVVAR = "XRCAM_TEST_WORKER_START"
# kept free in the results folder while a run writes, released to record run.json on a full disk
RESERVE_BYTES = 256 * 1024
RESERVE_NAME = ".xrcam-reserve"
_NO_SPACE = re.compile(r"\[Errno (28|122)\]|No space left on device|Disk quota exceeded")


@dataclass
class RunSummary:
    """What one ``xrcam run`` did; written to ``run.json`` and printed at the end."""

    results: str
    videos: int = 0
    videos_complete: int = 0
    frames: int = 0  # kept frames of every video in this run
    frames_processed: int = 0  # frames explained by this run (the rest were already done)
    shards: int = 0
    shards_processed: int = 0
    shards_skipped: int = 0
    workers: int = 0
    worker_restarts: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # discovery, Ray start and worker start-up (model loading) before work flows
    stopped: str | None = None  # why the run stopped before the end (a full disk), else None
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def plan_shards(entry, layout: VideoLayout, shard_frames: int) -> list[Shard]:
    """Split a video's kept frames into shards of ``shard_frames`` (a multiple of the chunk size)."""
    frames = layout.num_frames
    return [
        Shard(entry=entry, index=i, start=start, stop=min(start + shard_frames, frames))
        for i, start in enumerate(range(0, frames, shard_frames))
    ]


def _covered(done: set[tuple[int, int]], start: int, stop: int) -> bool:
    """Whether frames ``start:stop`` lie inside the union of the ``done`` ranges."""
    position = start
    for a, b in sorted(done):
        if a <= position < b:
            position = b
    return position >= stop


def run(
    settings: RunSettings,
    *,
    progress: bool = True,
    on_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Explain every video of the archive into ``settings.out``; see the module docstring.

    ``on_manifest`` is called with each shard's manifest as it arrives (progress hooks, tests).
    Raises an :class:`xrcam.errors.XrcamError` with one sentence when the run is refused (bad
    settings, weights, archive or labels; the store holds other settings; another process holds the
    results folder) or stops on a file-system problem (:class:`~xrcam.errors.XrcamStorageError`).
    """
    started = time.perf_counter()
    plan = preflight(settings)  # writes nothing, starts nothing
    with results_lock(plan.settings.out, "run"):
        try:
            return _run(plan, started, progress, on_manifest)
        finally:
            (Path(plan.settings.out) / RESERVE_NAME).unlink(missing_ok=True)


def _run(plan, started: float, progress: bool, on_manifest) -> RunSummary:
    from xrcam.models import file_sha256

    settings, entries = plan.settings, plan.entries
    classes = list(settings.classes)
    sha = file_sha256(settings.checkpoint) if settings.checkpoint else None
    try:
        store = ResultStore.open(
            settings.out, settings.store_settings(sha, classes), overwrite=settings.overwrite
        )
    except OSError as exc:
        raise storage_error(exc, settings.out) from exc
    reserve = _reserve(store.root)
    summary = RunSummary(results=str(store.root), videos=len(entries))
    summary.failures = list(plan.failures)
    log.info("%d videos to explain (%d known problems)", len(entries), len(plan.failures))

    scheduler = _Scheduler(settings, store, summary, on_manifest)
    problem: XrcamStorageError | None = None
    try:
        for entry in entries:
            scheduler.plan(entry)
        if scheduler.todo:  # nothing to do (a finished rerun) starts no Ray at all
            with _ray(settings.address):
                pool = _Pool(settings, classes, store)
                try:
                    summary.workers = len(pool.actors)
                    summary.startup_seconds = time.perf_counter() - started
                    scheduler.run(pool, progress)
                finally:
                    summary.worker_restarts = pool.restarts
                    pool.close()
        problem = scheduler.storage_problem
    except OSError as exc:  # the driver's own writes (group metadata, completion markers)
        problem = storage_error(exc, settings.out)
    if problem is not None:
        summary.stopped = str(problem)

    summary.videos_complete = sum(
        1 for e in entries if video_key(e.video_id) not in scheduler.failed_keys and _complete_for(store, e)
    )
    summary.seconds = time.perf_counter() - started
    if reserve is not None:
        reserve.unlink(missing_ok=True)
    recorded = _record(store, summary, settings)
    if problem is not None:
        done = (
            "what finished is recorded in run.json"
            if recorded is True
            else "run.json could not be written either, but every finished shard is marked in the store"
        )
        raise XrcamStorageError(problem.path, f"{problem.problem} ({done})") from None
    if recorded is not True:
        raise recorded
    return summary


def _complete_for(store: ResultStore, entry) -> bool:
    """Whether ``entry``'s own group (not another video's under the same key) is complete."""
    group = store.video(video_key(entry.video_id))
    return (
        group is not None
        and bool(group.attrs.get("complete"))
        and group.attrs.get("video_id", entry.video_id) == entry.video_id
    )


def _reserve(root: Path) -> Path | None:
    """A small file whose space the run gives back to write its records if the disk fills up."""
    path = Path(root) / RESERVE_NAME
    try:
        with open(path, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        return None
    return path


def _record(store: ResultStore, summary: RunSummary, settings: RunSettings) -> bool | XrcamStorageError:
    """Write failures.parquet and run.json; ``True``, or the storage error that prevented it."""
    try:
        store.write_failures(summary.failures)
        store.write_summary({**asdict(summary), "settings": settings.to_dict()})
    except OSError as exc:
        return storage_error(exc, store.root)
    return True


def _ray(address: str | None):
    """The Ray session of a run: :func:`workflows.ray_session.ray_session` (which also puts a local Ray
    it starts under :func:`workflows.ray_guard.orphan_guard`, so its processes die with this one)."""
    from workflows.ray_session import ray_session

    return ray_session(address)


class _Worker(ShardWorker):
    """The actor class: a :class:`ShardWorker` whose random initialisation (``--random-init``) is seeded,
    so every worker, and every replacement, builds the same weights (those of
    ``xrcam.load_model(..., seed=SEED)``)."""

    def __init__(self, settings, *args, **kwargs):
        failpoint = os.environ.get(FAILPOINT_ENVVAR, "")
        if failpoint == "raise":
            raise XrcamConfigError(f"{FAILPOINT_ENVVAR}=raise: this worker refuses to start")
        if failpoint.startswith("kill-once:"):
            marker = Path(failpoint.removeprefix("kill-once:"))
            try:
                with open(marker, "x") as fh:
                    fh.write(str(os.getpid()))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        if settings.get("random_init") is not None and not settings.get("checkpoint"):
            import torch

            torch.manual_seed(int(settings["random_init"]))  # consumed by load_model's create_model
        super().__init__(settings, *args, **kwargs)


_FRAME = re.compile(r" \(frame (\d+)\): ")


def _frame_of(error: dict[str, Any]) -> int | None:
    """The frame a worker's error names: its ``frame`` field, else the ``path (frame N): ...`` of an
    :class:`~xrcam.errors.XrcamInputError` message."""
    if error.get("frame") is not None:
        return int(error["frame"])
    match = _FRAME.search(str(error.get("message", "")))
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    """The last line of a Ray error that names a Python error, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"\w+(Error|Exception): ", line)]
    return (named or lines or [type(exc).__name__])[-1]


class _Pool:
    """Worker actors, one per GPU (or CPU workers), with a bounded number of tasks each.

    Start-up waits until every actor has built its model. An actor whose process dies meanwhile
    (SIGKILL during model loading, a node lost) is replaced, up to :data:`MAX_START_FAILURES` times in
    all; an exception raised by the worker's constructor is deterministic (every replacement would
    raise it too) and aborts the run with its message.
    """

    def __init__(self, settings: RunSettings, classes: list[str], store: ResultStore):
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if gpus:
            count = settings.workers or gpus
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            threads = None
        else:
            count = settings.workers or max(1, cpus // 2)
            threads = max(1, cpus // count)
            options = {"num_cpus": threads}
        self._remote = ray.remote(_Worker).options(max_restarts=0, **options)
        self._args = (
            settings.to_dict(),
            classes,
            str(store.root),
            threads,
            logging.getLogger().getEffectiveLevel(),
        )
        self.actors: list[Any] = []
        self.restarts = 0
        self.start_failures = 0
        self.busy: dict[Any, int] = {}
        starting = {}
        for _ in range(count):
            actor = self._remote.remote(*self._args)
            starting[actor.pid.remote()] = actor
        try:
            while starting:
                [ref], _ = ray.wait(list(starting), num_returns=1)
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self._start_failed(exc)
                    fresh = self._remote.remote(*self._args)
                    starting[fresh.pid.remote()] = fresh
                    continue
                self.actors.append(actor)
                self.busy[actor] = 0
        except BaseException:
            for actor in [*self.actors, *starting.values()]:
                ray.kill(actor)
            raise

    def _start_failed(self, exc: BaseException) -> None:
        """A worker did not start: raise when that is deterministic or happened too often."""
        if getattr(exc, "actor_init_failed", False):
            raise XrcamConfigError(f"the workers could not start: {_reason(exc)}") from exc
        self.start_failures += 1
        if self.start_failures > MAX_START_FAILURES:
            raise XrcamError(
                f"workers died {self.start_failures} times while starting (last: {_reason(exc)}); "
                "check the nodes' memory and logs, then rerun the same command to resume"
            ) from exc
        self.restarts += 1
        log.warning("a worker died while starting; starting a fresh one (%d so far)", self.start_failures)

    def replace(self, actor) -> None:
        """Swap a dead actor for a fresh one."""
        self.busy.pop(actor, None)
        self.actors.remove(actor)
        fresh = self._remote.remote(*self._args)
        self.actors.append(fresh)
        self.busy[fresh] = 0
        self.restarts += 1
        log.warning("a worker died; started a fresh one (%d restarts so far)", self.restarts)

    def idle(self):
        """The least busy actor that can take another task, or ``None``."""
        actor = min(self.actors, key=self.busy.__getitem__)
        return actor if self.busy[actor] < IN_FLIGHT_PER_WORKER else None

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class _Scheduler:
    """Tasks still to do (describe a new video, or process a shard) and what happens to their results."""

    def __init__(self, settings: RunSettings, store: ResultStore, summary: RunSummary, on_manifest) -> None:
        self.settings, self.store, self.summary, self.on_manifest = settings, store, summary, on_manifest
        self.todo: deque[tuple[str, Any, int]] = deque()  # (kind, entry or Shard, attempt)
        self.frames_todo = 0
        self.bar = None
        self.failed_keys: set[str] = set()  # videos with a failure in this run: never counted complete
        self.storage_problem: XrcamStorageError | None = None  # set on a full disk: stop submitting

    def plan(self, entry) -> None:
        """Queue a video: its unfinished shards when its group exists, else a describe task first."""
        layout = self.store.layout(video_key(entry.video_id))
        if layout is None:
            self.todo.appendleft(("describe", entry, 1))
            return
        self.summary.frames += layout.num_frames
        done = self.store.shards_done(layout.key)
        # a video's shard size is fixed when its group is created (the Zarr shard size): a resume
        # with another --shard-chunks keeps it for the videos begun and uses the new one for the rest
        for shard in plan_shards(entry, layout, self.store.shard_frames(layout)):
            self.summary.shards += 1
            if _covered(done, shard.start, shard.stop):
                self.summary.shards_skipped += 1
            else:
                self.todo.append(("process", shard, 1))
                self._grow(shard.num_frames)

    def _grow(self, frames: int) -> None:
        self.frames_todo += frames
        if self.bar is not None:
            self.bar.total = self.frames_todo
            self.bar.refresh()

    def run(self, pool: _Pool, progress: bool) -> None:
        """Keep every actor fed until all tasks are back."""
        import ray
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.frames_todo, unit="frame", desc="xrcam run", disable=not progress, dynamic_ncols=True
        )
        in_flight: dict[Any, tuple[Any, str, Any, int]] = {}  # ref -> (actor, kind, item, attempt)
        while self.todo or in_flight:
            while self.todo and (actor := pool.idle()) is not None:
                kind, item, attempt = self.todo.popleft()
                ref = actor.describe.remote(item) if kind == "describe" else actor.process.remote(item)
                in_flight[ref] = (actor, kind, item, attempt)
                pool.busy[actor] += 1
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, kind, item, attempt = in_flight.pop(ref)
            if actor in pool.busy:
                pool.busy[actor] -= 1
            self._collect(pool, ref, actor, kind, item, attempt)
        self.bar.close()

    def _collect(self, pool: _Pool, ref, actor, kind: str, item, attempt: int) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        entry = item if kind == "describe" else item.entry
        shard_index = -1 if kind == "describe" else item.index
        try:
            result = ray.get(ref)
        except RayTaskError as exc:  # a bug outside the worker's own error handling: record, carry on
            cause = exc.cause if exc.cause is not None else exc
            self._fail(
                entry, shard_index, type(cause).__name__, str(cause), item if kind == "process" else None
            )
            return
        except RayError as exc:  # the worker process died (killed, out of memory, node lost): retry elsewhere
            if getattr(exc, "actor_init_failed", False):  # a replacement cannot start: deterministic
                raise XrcamConfigError(f"a fresh worker could not start: {_reason(exc)}") from exc
            if actor in pool.busy:
                pool.replace(actor)
            if self.storage_problem is not None:
                return
            if attempt < MAX_ATTEMPTS:
                self.todo.appendleft((kind, item, attempt + 1))
            else:
                message = f"worker died {attempt} times on this shard: {exc}"
                self._fail(
                    entry, shard_index, type(exc).__name__, message, item if kind == "process" else None
                )
            return
        if result["error"]:
            error = result["error"]
            if _NO_SPACE.search(str(error.get("message", ""))):
                self._stop_on_full_disk(error["message"])
                self._grow(-item.num_frames if kind == "process" else 0)
                return
            self._fail(
                entry,
                shard_index,
                error["error_type"],
                error["message"],
                item if kind == "process" else None,
                _frame_of(error),
            )
        elif kind == "describe":
            if self.storage_problem is not None:
                return
            self.store.create_video(result["layout"])
            self.plan(entry)
        else:
            self.store.mark_done(item.key, item.start, item.stop)  # after the data: the completion marker
            log.debug(
                "shard %d of %s done: %d frames in %.1f s (worker pid %d)",
                item.index,
                item.video_id,
                result["frames"],
                result["seconds"],
                result["pid"],
            )
            self.summary.shards_processed += 1
            self.summary.frames_processed += result["frames"]
            self.bar.update(result["frames"])
            if self.on_manifest is not None:
                self.on_manifest(result)

    def _stop_on_full_disk(self, message: str) -> None:
        """The disk is full: submit nothing more; the tasks in flight still come back."""
        if self.storage_problem is None:
            self.storage_problem = storage_error(OSError(errno.ENOSPC, message), self.store.root)
            log.error("%s: %s; stopping", self.store.root, message)
        self.todo.clear()

    def _fail(
        self,
        entry,
        shard_index: int,
        error_type: str,
        message: str,
        shard: Shard | None,
        frame: int | None = None,
    ) -> None:
        self.failed_keys.add(video_key(entry.video_id))
        self.summary.failures.append(
            failure_row(entry.path, entry.video_id, shard_index, error_type, message, frame)
        )
        if shard is not None:
            self._grow(-shard.num_frames)
