"""The ``xrcam run`` driver: archive -> shards -> a pool of Ray worker actors -> one Zarr store.

The driver discovers the archive, creates every group and array of the store up front (from a small
per-video description a worker returns), then keeps each actor fed with a bounded number of shards.
Workers write their own chunks and return a manifest; the driver records the shard as done only after
that, so a rerun skips exactly the shards whose data is complete. A worker that dies (killed, lost node)
is replaced by a fresh actor and its shards are resubmitted; an error inside one video is recorded in
the failures table and the run carries on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workflows.settings import RunSettings
from workflows.store import ResultStore, VideoLayout, video_key
from workflows.worker import Shard, ShardWorker
from xrcam.errors import XrcamConfigError

__all__ = ["RunSummary", "plan_shards", "run", "start_ray"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a shard whose worker dies this many times is recorded as failed
IN_FLIGHT_PER_WORKER = 2  # one running, one queued at the actor, so a worker never waits for the driver


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


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` or start a local Ray on 127.0.0.1 without dashboard.

    Returns whether this call started Ray (and so should shut it down); an already running Ray
    (tests, notebooks) is reused.
    """
    if not address:
        # read by ray at import: the local node then uses 127.0.0.1 rather than an outward-facing IP
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    return True


def _failure(entry_or_path, video_id: str, shard: int, error_type: str, message: str) -> dict[str, Any]:
    return {
        "path": str(entry_or_path),
        "video_id": video_id,
        "shard": shard,
        "error_type": error_type,
        "message": message,
    }


def run(
    settings: RunSettings,
    *,
    progress: bool = True,
    on_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Explain every video of the archive into ``settings.out``; see the module docstring.

    ``on_manifest`` is called with each shard's manifest as it arrives (progress hooks, tests).
    Raises :class:`xrcam.errors.XrcamConfigError` when the store holds other settings.
    """
    import xrcam
    from xrcam.archive import discover_archive
    from xrcam.models import file_sha256

    started = time.perf_counter()
    archive = discover_archive(settings.archive)
    entries = list(archive.entries)
    if settings.split:
        entries = _split_entries(entries, settings)
    classes = list(settings.classes or sorted({e.label for e in archive.entries}))
    methods = list(settings.methods or xrcam.list_methods())
    settings = settings.replace(methods=tuple(methods), classes=tuple(classes))
    sha = file_sha256(settings.checkpoint) if settings.checkpoint else None
    store = ResultStore.open(
        settings.out, settings.store_settings(sha, classes), overwrite=settings.overwrite
    )
    summary = RunSummary(results=str(store.root), videos=len(entries))
    summary.failures = [
        _failure(problem.path, _problem_video_id(problem, archive.root), -1, "XrcamInputError", str(problem))
        for problem in archive.problems
    ]
    log.info("%d videos to explain (%d discovery problems)", len(entries), len(archive.problems))

    scheduler = _Scheduler(settings, store, summary, on_manifest)
    for entry in entries:
        scheduler.plan(entry)
    if scheduler.todo:  # nothing to do (a finished rerun) starts no Ray at all
        owns_ray = start_ray(settings.address)
        import ray

        try:
            pool = _Pool(settings, classes, store)
            summary.workers = len(pool.actors)
            summary.startup_seconds = time.perf_counter() - started
            scheduler.run(pool, progress)
            summary.worker_restarts = pool.restarts
            pool.close()
        finally:
            if owns_ray:
                ray.shutdown()

    summary.videos_complete = sum(
        1
        for e in entries
        if (g := store.video(video_key(e.video_id))) is not None and g.attrs.get("complete")
    )
    summary.seconds = time.perf_counter() - started
    store.write_failures(summary.failures)
    store.write_summary({**asdict(summary), "settings": settings.to_dict()})
    return summary


def _split_entries(entries: list, settings: RunSettings) -> list:
    """The videos of ``settings.split``: the checkpoint's own split when its sidecar records one
    (so ``--split test`` explains exactly the videos the model never trained on), else a fresh
    patient-level split with the library defaults."""
    from xrcam.archive import split_patients
    from xrcam.models import read_checkpoint_sidecar

    recorded = (
        (read_checkpoint_sidecar(settings.checkpoint) or {}).get("split") if settings.checkpoint else None
    )
    if recorded and recorded.get("videos"):
        wanted = set(recorded["videos"].get(settings.split, []))
        return [e for e in entries if e.video_id in wanted]
    options = {k: recorded[k] for k in ("fractions", "seed") if recorded and recorded.get(k) is not None}
    splits = split_patients(entries, **options)
    return [e for e in entries if splits.get(e.patient) == settings.split]


def _problem_video_id(problem, root: Path) -> str:
    """The archive-relative id of the video a discovery problem belongs to (or of the file itself)."""
    path = Path(getattr(problem, "video", None) or problem.path)
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path.name


class _Pool:
    """Worker actors, one per GPU (or CPU workers), with a bounded number of tasks each."""

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
        self._remote = ray.remote(ShardWorker).options(max_restarts=0, **options)
        self._args = (
            settings.to_dict(),
            classes,
            str(store.root),
            threads,
            logging.getLogger().getEffectiveLevel(),
        )
        self.actors = [self._remote.remote(*self._args) for _ in range(count)]
        self.restarts = 0
        self.busy: dict[Any, int] = {actor: 0 for actor in self.actors}
        # fail fast with the real reason when workers cannot even start (bad checkpoint, missing module)
        try:
            ray.get([actor.pid.remote() for actor in self.actors])
        except ray.exceptions.RayError as exc:
            for actor in self.actors:
                ray.kill(actor)
            reason = [line for line in str(exc).splitlines() if "Error" in line][-1:] or [str(exc)]
            raise XrcamConfigError(f"the workers could not start: {reason[0].strip()}") from exc

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

    def plan(self, entry) -> None:
        """Queue a video: its unfinished shards when its group exists, else a describe task first."""
        layout = self.store.layout(video_key(entry.video_id))
        if layout is None:
            self.todo.appendleft(("describe", entry, 1))
            return
        self.summary.frames += layout.num_frames
        done = self.store.shards_done(layout.key)
        for shard in plan_shards(entry, layout, self.settings.shard_frames):
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
            if actor in pool.busy:
                pool.replace(actor)
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
            self._fail(
                entry, shard_index, error["error_type"], error["message"], item if kind == "process" else None
            )
        elif kind == "describe":
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

    def _fail(self, entry, shard_index: int, error_type: str, message: str, shard: Shard | None) -> None:
        self.summary.failures.append(_failure(entry.path, entry.video_id, shard_index, error_type, message))
        if shard is not None:
            self._grow(-shard.num_frames)
