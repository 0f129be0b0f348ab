"""``ShardWorker``: loads the model once, then explains shards of videos and writes their chunks itself.

A plain class, usable and testable without Ray; :mod:`workflows.driver` wraps it with ``ray.remote``.
Inside one shard three stages overlap so the explainer rarely waits: a reader thread decodes and
preprocesses batches, the calling thread runs the explainer, a writer thread assembles whole chunks and
writes them to the store, one whole work shard (one file per array) at a time. Frames are read with
:func:`xrcam.frames.read_batches`, the one reader that evaluation and the read API use too. Only a
small manifest goes back to the driver.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from workflows.settings import RunSettings
from workflows.store import ResultStore, VideoLayout, video_key

__all__ = ["Shard", "ShardWorker"]

log = logging.getLogger(__name__)

_QUEUE_DEPTH = 2  # batches decoded ahead of the explainer / waiting for the writer
_END = object()


@dataclass(frozen=True)
class Shard:
    """Kept frames ``start:stop`` (positions after ``frame_step``) of one video; whole chunks only."""

    entry: Any  # xrcam.archive.VideoEntry
    index: int  # shard number within the video
    start: int
    stop: int

    @property
    def video_id(self) -> str:
        return self.entry.video_id

    @property
    def key(self) -> str:
        return video_key(self.entry.video_id)

    @property
    def num_frames(self) -> int:
        return self.stop - self.start


class _Failed:
    """An exception raised in a helper thread, handed to the calling thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class ShardWorker:
    """Explains shards with one model; configuration comes in through the constructor only.

    ``settings``: :meth:`RunSettings.to_dict`; ``classes``: class names in logit order; ``results``:
    the results folder (its store must exist: the driver creates it); ``threads``: torch CPU threads;
    ``log_level``: set inside a Ray actor so worker log lines follow the driver's verbosity.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        classes: list[str],
        results: str,
        threads: int | None = None,
        log_level: int | None = None,
    ):
        if log_level is not None:  # our loggers only: third-party debug output would drown the run's
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            for name in ("workflows", "xrcam"):
                logging.getLogger(name).setLevel(log_level)
        import torch

        import xrcam

        if threads:
            torch.set_num_threads(threads)
        self.settings = RunSettings(**settings)
        self.classes = list(classes)
        self.store = ResultStore.open(results)
        self.device = torch.device(self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = self.settings.batch_size
        model = xrcam.load_model(
            self.settings.model,
            num_classes=len(self.classes),
            checkpoint=self.settings.checkpoint,
            dropout=self.settings.dropout,
            seed=None if self.settings.checkpoint else self.settings.random_init,
        )
        self.model = model.to(self.device).eval()
        self.methods = list(self.store.methods)
        self.layers = list(self.settings.layers)
        self.explainer = xrcam.create_explainer(
            self.model,
            methods=self.methods,
            layers=self.layers,
            rules=self.settings.rules,
            clrp=self.settings.clrp,
        )
        self._map_shapes: dict[tuple[int, int], dict[str, tuple[int, int]]] = {}

    def pid(self) -> int:
        """The worker's process id (tests kill it to check fault tolerance)."""
        return os.getpid()

    # ----------------------------------------------------------------- per video
    def describe(self, entry) -> dict[str, Any]:
        """Open a video, detect its crop and work out the shape of everything stored for it.

        Returns ``{"layout": VideoLayout | None, "error": None | {"error_type", "message"[, "frame"]}}``.
        """
        try:
            return {"layout": self._describe(entry), "error": None}
        except Exception as exc:  # recorded by the driver; the run carries on with the other videos
            log.warning("%s: %s: %s", entry.video_id, type(exc).__name__, exc)
            return {"layout": None, "error": _error(exc)}

    def _describe(self, entry) -> VideoLayout:
        from xrcam.frames import open_preprocessor
        from xrcam.io.readers import open_video

        with open_video(entry.path) as reader:
            pre = open_preprocessor(reader, self.settings.preprocess_config())
            num_source_frames = reader.num_frames
            if num_source_frames < 1:
                from xrcam.errors import XrcamInputError

                raise XrcamInputError(entry.path, "holds no frames")
            first = next(iter(reader.read(start=0, stop=1)))[1]
            x = pre(first[None])
        crop = tuple(int(v) for v in pre.crop)
        return VideoLayout(
            video_id=entry.video_id,
            path=str(entry.path),
            patient=entry.patient,
            label=entry.label,
            label_index=self.classes.index(entry.label) if entry.label in self.classes else -1,
            crop=crop,
            frame_step=self.settings.frame_step,
            num_source_frames=num_source_frames,
            num_classes=len(self.classes),
            map_shapes=self._stage_shapes(tuple(x.shape[-2:])),
            input_size=int(x.shape[-1]),
            shard_frames=self.settings.shard_frames,
        )

    def _stage_shapes(self, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Spatial size of each explained stage for inputs of ``size`` (one forward pass, cached)."""
        from xrcam.hooks import stage_shapes

        if size not in self._map_shapes:
            self._map_shapes[size] = stage_shapes(self.model, size, self.layers, device=self.device)
        return self._map_shapes[size]

    # ----------------------------------------------------------------- per shard
    def process(self, shard: Shard) -> dict[str, Any]:
        """Explain and write one shard; returns its manifest (``error`` set when it failed)."""
        started, cpu_started = time.perf_counter(), time.process_time()
        manifest: dict[str, Any] = {
            "video_id": shard.video_id,
            "path": str(shard.entry.path),
            "shard": shard.index,
            "start": shard.start,
            "stop": shard.stop,
            "pid": os.getpid(),
            "frames": 0,
            "error": None,
        }
        try:
            manifest["frames"] = self._process(shard)
        except Exception as exc:  # one bad video must not stop the run: the driver records it
            log.warning("shard %d of %s failed: %s: %s", shard.index, shard.video_id, type(exc).__name__, exc)
            manifest["error"] = _error(exc)
        manifest["seconds"] = time.perf_counter() - started
        manifest["cpu_seconds"] = time.process_time() - cpu_started  # all threads of the worker process
        manifest["batch_size"] = self.batch_size
        return manifest

    def _process(self, shard: Shard) -> int:
        layout = self.store.layout(shard.key)
        if layout is None:
            raise RuntimeError(f"video group {shard.key!r} missing from {self.store.root}")
        log.debug("shard %d of %s: frames %d-%d", shard.index, shard.video_id, shard.start, shard.stop)
        batches: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        results: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        stop = threading.Event()
        written: list[int] = []
        errors: list[BaseException] = []
        reader = threading.Thread(target=self._read, args=(shard, layout, batches, stop), daemon=True)
        writer = threading.Thread(target=self._write, args=(shard, results, written, errors), daemon=True)
        reader.start()
        writer.start()
        try:
            for batch in _drain(batches):
                if errors or not _put_until(results, self._explain(batch), alive=writer):
                    break  # the writer failed; its error is raised below
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()
            _put_until(results, _END, alive=writer)
            writer.join()
            reader.join()
        if errors:
            raise errors[0]
        return sum(written)

    def _read(self, shard: Shard, layout: VideoLayout, out: queue.Queue, stop: threading.Event) -> None:
        """Reader thread: decode and preprocess the shard's frames in batches (the one frame reader)."""
        from xrcam.frames import read_batches

        try:
            for batch in read_batches(
                shard.entry,
                self.settings.preprocess_config(),
                start=shard.start,
                stop=shard.stop,
                batch_size=self.batch_size,
                crop=layout.crop,
            ):
                item = {"x": batch.x, "gt_mask": batch.gt, "has_gt_mask": batch.has_gt}
                if not _put_until(out, item, stop=stop):
                    return
            _put_until(out, _END, stop=stop)
        except BaseException as exc:
            _put_until(out, _Failed(exc), stop=stop)

    def _explain(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Explain one batch on the device; on GPU out-of-memory halve the batch size and retry."""
        import torch

        x = batch.pop("x")
        while True:
            try:
                parts = [
                    self._explain_part(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)
                ]
                break
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("GPU out of memory: batch size halved to %d", self.batch_size)
        for name in parts[0]:
            axis = 1 if name in self.layers else 0
            batch[name] = np.concatenate([part[name] for part in parts], axis=axis)
        return batch

    def _explain_part(self, x) -> dict[str, np.ndarray]:
        import torch

        exp = self.explainer(x.to(self.device, non_blocking=True))
        logits = exp.logits.detach().float()
        out = {"logits": logits.cpu().numpy()}
        for layer in self.layers:  # (method, batch, h, w): the store's layout of one stage
            stack = torch.stack([exp.maps[method][layer].detach() for method in self.methods])
            out[layer] = stack.to(torch.float16).cpu().numpy()
        return out

    def _write(
        self, shard: Shard, results: queue.Queue, written: list[int], errors: list[BaseException]
    ) -> None:
        """Writer thread: gather the whole shard, then write it once (one shard file per array)."""
        pending: dict[str, list[np.ndarray]] = {}
        try:
            for item in iter(results.get, _END):
                for name, data in item.items():
                    pending.setdefault(name, []).append(data)
            if not pending:
                return
            merged = {
                name: np.concatenate(parts, axis=1 if name in self.layers else 0)
                for name, parts in pending.items()
            }
            rows = len(merged["logits"])
            if shard.start + rows != shard.stop:
                return  # the reader or explainer stopped early; its error is raised by the caller
            self.store.write_shard(
                shard.key,
                shard.start,
                logits=merged["logits"],
                gt_mask=merged["gt_mask"],
                has_gt_mask=merged["has_gt_mask"],
                maps={layer: merged[layer] for layer in self.layers},
            )
            written.append(rows)
        except BaseException as exc:
            errors.append(exc)


def _drain(q: queue.Queue) -> Iterator[Any]:
    """Items of ``q`` until the end marker; re-raises a helper thread's exception."""
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, _Failed):
            raise item.exc
        yield item


def _put_until(
    q: queue.Queue, item: Any, alive: threading.Thread | None = None, stop: threading.Event | None = None
) -> bool:
    """Put ``item`` unless the consumer is gone (``alive`` ended) or asked us to stop; returns whether it went in."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if (alive is not None and not alive.is_alive()) or (stop is not None and stop.is_set()):
                return False


def _error(exc: BaseException) -> dict[str, Any]:
    """The error record of a failed video or shard; ``frame`` where the exception names one (e.g. a bad mask)."""
    error: dict[str, Any] = {"error_type": type(exc).__name__, "message": str(exc)}
    frame = getattr(exc, "frame", None)
    if frame is not None:
        error["frame"] = int(frame)
    return error
