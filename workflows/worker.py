"""``ShardWorker``: loads the model once, then explains shards of videos and writes their chunks itself.

A plain class, usable and testable without Ray; :mod:`workflows.driver` wraps it with ``ray.remote``.
Inside one shard three stages overlap so the explainer rarely waits: a reader thread decodes and
preprocesses batches, the calling thread runs the explainer, a writer thread assembles whole chunks and
writes them to the store. Only a small manifest goes back to the driver.
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
from workflows.store import ResultStore, VideoLayout, map_name, video_key

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
    def _preprocessor(self, reader):
        """The video's preprocessing; FOV detection reads frame 0, so every shard gets the same crop."""
        from xrcam.preprocess import Preprocessor

        return Preprocessor.for_video(reader, self.settings.preprocess_config())

    def describe(self, entry) -> dict[str, Any]:
        """Open a video, detect its crop and work out the shape of everything stored for it.

        Returns ``{"layout": VideoLayout | None, "error": None | {"error_type", "message"}}``.
        """
        try:
            return {"layout": self._describe(entry), "error": None}
        except Exception as exc:  # recorded by the driver; the run carries on with the other videos
            log.warning("%s: %s: %s", entry.video_id, type(exc).__name__, exc)
            return {"layout": None, "error": {"error_type": type(exc).__name__, "message": str(exc)}}

    def _describe(self, entry) -> VideoLayout:
        from xrcam.io.readers import open_video

        with open_video(entry.path) as reader:
            pre = self._preprocessor(reader)
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
        )

    def _stage_shapes(self, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Spatial size of each explained stage for inputs of ``size`` (one forward pass, cached)."""
        import torch

        if size not in self._map_shapes:
            shapes: dict[str, tuple[int, int]] = {}
            hooks = [
                self.model.get_submodule(layer).register_forward_hook(
                    lambda _m, _i, out, layer=layer: shapes.__setitem__(layer, tuple(out.shape[-2:]))
                )
                for layer in self.layers
            ]
            try:
                with torch.no_grad():
                    self.model(torch.zeros(1, 3, *size, device=self.device))
            finally:
                for hook in hooks:
                    hook.remove()
            self._map_shapes[size] = {layer: shapes[layer] for layer in self.layers}
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
            manifest["error"] = {"error_type": type(exc).__name__, "message": str(exc)}
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
        """Reader thread: decode and preprocess the shard's frames in batches."""
        from xrcam.archive import load_masks
        from xrcam.errors import XrcamInputError
        from xrcam.io.readers import open_video

        try:
            step = layout.frame_step
            masks = load_masks(shard.entry) if shard.entry.mask_path else {}
            with open_video(shard.entry.path) as reader:
                pre = self._preprocessor(reader)
                if tuple(pre.crop) != layout.crop:
                    raise XrcamInputError(
                        shard.entry.path,
                        f"crop is now {tuple(pre.crop)} but the store was created with {layout.crop}: "
                        "the video changed since; rerun with --overwrite",
                    )
                position = shard.start
                for indices, frames in _batched(
                    reader.read(start=shard.start * step, stop=shard.stop * step, step=step), self.batch_size
                ):
                    expected = list(range(position * step, (position + len(indices)) * step, step))
                    if indices != expected:
                        raise XrcamInputError(
                            shard.entry.path,
                            f"reader returned frames {indices[:3]}..., expected {expected[:3]}...",
                        )
                    size = layout.size
                    gt = np.zeros((len(indices), size, size), np.uint8)
                    has_gt = np.zeros(len(indices), bool)
                    for row, index in enumerate(indices):
                        if index in masks:
                            gt[row] = pre.crop_mask(masks[index])
                            has_gt[row] = True
                    batch = {"frame_index": np.asarray(indices, np.int64), "x": pre(frames)}
                    batch.update(gt_mask=gt, has_gt_mask=has_gt)
                    if not _put_until(out, batch, stop=stop):
                        return
                    position += len(indices)
            if position != shard.stop:
                raise XrcamInputError(
                    shard.entry.path,
                    f"video ended after {position * step} frames, its header says more",
                    frame=position * step,
                )
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
            batch[name] = np.concatenate([part[name] for part in parts])
        return batch

    def _explain_part(self, x) -> dict[str, np.ndarray]:
        import torch

        exp = self.explainer(x.to(self.device, non_blocking=True))
        logits = exp.logits.detach().float()
        out = {
            "logits": logits.cpu().numpy(),
            "probabilities": torch.softmax(logits, dim=1).cpu().numpy(),
            "predicted": logits.argmax(dim=1).to(torch.int64).cpu().numpy(),
        }
        for method in self.methods:
            for layer in self.layers:
                out[map_name(method, layer)] = (
                    exp.maps[method][layer].detach().to(torch.float16).cpu().numpy()
                )
        return out

    def _write(
        self, shard: Shard, results: queue.Queue, written: list[int], errors: list[BaseException]
    ) -> None:
        """Writer thread: gather rows into whole chunks and write each chunk once."""
        chunk = self.store.chunk_frames
        pending: dict[str, list[np.ndarray]] = {}
        filled, position = 0, shard.start
        try:
            for item in iter(results.get, _END):
                for name, data in item.items():
                    pending.setdefault(name, []).append(data)
                filled += len(item["frame_index"])
                while filled >= chunk or (filled and position + filled == shard.stop):
                    rows = min(chunk, filled)
                    merged = {name: np.concatenate(parts) for name, parts in pending.items()}
                    self.store.write(
                        shard.key, position, {name: data[:rows] for name, data in merged.items()}
                    )
                    pending = {name: [data[rows:]] for name, data in merged.items()}
                    filled, position = filled - rows, position + rows
                    written.append(rows)
        except BaseException as exc:
            errors.append(exc)


def _batched(frames: Iterator[tuple[int, np.ndarray]], size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    indices: list[int] = []
    stack: list[np.ndarray] = []
    for index, frame in frames:
        indices.append(int(index))
        stack.append(frame)
        if len(stack) == size:
            yield indices, np.stack(stack)
            indices, stack = [], []
    if stack:
        yield indices, np.stack(stack)


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
