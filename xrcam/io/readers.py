"""One reading interface over every pCLE video format an archive holds (SPEC §1).

``open_video(path)`` picks the reader from the suffix (or a directory of frames). Every reader knows
its frame count and frame geometry without decoding the whole video, and ``read(start, stop, step)``
yields ``(original_frame_index, frame)`` so shards of one video can be read independently. Frames come
out grey, ``(H, W)``, uint8 or uint16; colour sources are converted to luma.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xrcam.errors import XrcamInputError
from xrcam.io import mkt

__all__ = [
    "VIDEO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "VideoReader",
    "MktReader",
    "AvReader",
    "TiffStackReader",
    "ImageFolderReader",
    "open_video",
    "natural_key",
    "read_image",
]

AV_SUFFIXES = frozenset({".avi", ".mp4", ".mov", ".mkv"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mkt"}) | AV_SUFFIXES | TIFF_SUFFIXES
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"}) | TIFF_SUFFIXES
_LUMA = np.array([0.299, 0.587, 0.114])


def natural_key(name: str) -> list:
    """Sort key that orders ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _to_grey(array: np.ndarray) -> np.ndarray:
    """(H, W) stays; (H, W, 3|4) and planar (3|4, H, W) become luma in the same dtype."""
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        grey = np.rint(array[..., :3].astype(np.float64) @ _LUMA)
        return grey.astype(array.dtype)
    raise ValueError(f"unsupported pixel layout {array.shape}")


class VideoReader(ABC):
    """A video or frame sequence: count and geometry up front, frames on demand.

    Attributes: ``path``, ``num_frames``, ``frame_shape`` (H, W), ``dtype`` (uint8 or uint16) and
    ``metadata`` (public keys only; identifying keys such as ``patient_id`` are never kept).
    """

    path: Path
    num_frames: int
    frame_shape: tuple[int, int]
    dtype: np.dtype
    metadata: dict[str, str]

    def read(
        self, start: int = 0, stop: int | None = None, step: int = 1
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, frame)`` for the original frame indices in ``range(start, stop, step)``.

        ``stop=None`` means the end; a ``stop`` past the end is clipped to ``num_frames``.
        """
        if start < 0 or step < 1 or (stop is not None and stop < 0):
            raise ValueError(f"need start >= 0, stop >= 0 and step >= 1, got {start}, {stop}, {step}")
        stop = self.num_frames if stop is None else min(stop, self.num_frames)
        indices = range(start, stop, step)
        if not indices:
            return
        for index, frame in self._frames(indices):
            if frame.shape != self.frame_shape:
                raise XrcamInputError(
                    self.path,
                    f"frame is {_hw(frame.shape)} but the video's frames are {_hw(self.frame_shape)}",
                    frame=index,
                )
            if frame.dtype != self.dtype:
                raise XrcamInputError(
                    self.path, f"frame is {frame.dtype} but the video is {self.dtype}", frame=index
                )
            yield index, frame

    @abstractmethod
    def _frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        """Yield exactly the frames in ``indices`` (non-empty, within bounds), in order."""

    def close(self) -> None:  # noqa: B027 - readers that open files per read have nothing to release
        """Release the open file, if the reader keeps one."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        h, w = self.frame_shape
        return f"{type(self).__name__}({str(self.path)!r}, frames={self.num_frames}, {w}x{h}, {np.dtype(self.dtype).name})"


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" if len(shape) >= 2 else str(shape)


class MktReader(VideoReader):
    """Cellvizio ``.mkt``: pixels at computed offsets, so any frame is read without the others.

    ``signed``: how to read the 16-bit pixels (None = decide per frame, see :mod:`xrcam.io.mkt`);
    negatives are clipped to 0 and frames come out uint16.
    """

    def __init__(self, path: str | Path, signed: bool | None = None):
        self.path = Path(path)
        self._layout = mkt.read_layout(self.path)
        self._signed = signed
        self.num_frames = self._layout.num_frames
        self.frame_shape = self._layout.shape
        self.dtype = np.dtype(np.uint16)
        self.metadata = dict(self._layout.metadata)

    def _frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        return mkt.iter_mkt_frames(self._layout, indices, self._signed)


class AvReader(VideoReader):
    """``.avi``/``.mp4`` (and other FFmpeg containers) through PyAV.

    The frame count comes from the container header, or from demuxing packets without decoding when
    the header has none. Reading a range seeks to the keyframe before ``start`` when frame times allow.
    """

    def __init__(self, path: str | Path):
        import av

        self.path = Path(path)
        if _size(self.path) == 0:
            raise XrcamInputError(self.path, "the video file is empty (0 bytes); re-export or re-copy it")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise XrcamInputError(
                self.path, f"cannot open the video ({exc}); is the file complete and a real video?"
            ) from exc
        if not self._container.streams.video:
            self.close()
            raise XrcamInputError(self.path, "the file holds no video stream")
        stream = self._container.streams.video[0]
        ctx = stream.codec_context
        self._stream = stream
        if not ctx.width or not ctx.height or ctx.format is None:
            self.close()
            raise XrcamInputError(
                self.path, "the video stream has no frame size or pixel format; the file is damaged"
            )
        self.frame_shape = (ctx.height, ctx.width)
        deep = max(c.bits for c in ctx.format.components) > 8
        self.dtype = np.dtype(np.uint16 if deep else np.uint8)
        self._format = "gray16le" if deep else "gray"
        self.num_frames = stream.frames or self._count_packets()
        if self.num_frames <= 0:
            self.close()
            raise XrcamInputError(self.path, "the video holds no frame")
        self.metadata = {
            k: v
            for k, v in {**self._container.metadata, **stream.metadata}.items()
            if not mkt.is_identifying_key(k)
        }
        self.metadata.setdefault("codec", ctx.name)

    def _count_packets(self) -> int:
        try:
            count = sum(1 for packet in self._container.demux(self._stream) if packet.size)
        except Exception as exc:  # PyAV raises several FFmpeg error types while demuxing damaged files
            raise XrcamInputError(self.path, f"cannot read the video's packets ({exc})") from exc
        self._container.seek(0)
        return count

    def _index(self, frame) -> int | None:
        rate = self._stream.average_rate or self._stream.guessed_rate
        if frame.pts is None or not rate:
            return None
        start = self._stream.start_time or 0
        return round(float((frame.pts - start) * self._stream.time_base * rate))

    def _frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        import av

        counter = 0
        use_pts = False
        if indices.start > 0:
            rate = self._stream.average_rate or self._stream.guessed_rate
            if rate:
                target = int(indices.start / rate / self._stream.time_base) + (self._stream.start_time or 0)
                self._container.seek(target, backward=True, any_frame=False, stream=self._stream)
                use_pts = True
        else:
            self._container.seek(0)
        wanted = iter(indices)
        nxt = next(wanted)
        try:
            for frame in self._container.decode(self._stream):
                index = self._index(frame) if use_pts else counter
                counter += 1
                if index is None or (use_pts and index > indices.start and counter == 1):
                    # frame times unusable or the seek overshot: read from the beginning instead
                    yield from self._sequential(indices)
                    return
                if index < nxt:
                    continue
                yield index, frame.to_ndarray(format=self._format)
                nxt = next(wanted, None)
                if nxt is None:
                    return
        except av.FFmpegError as exc:
            raise XrcamInputError(self.path, f"cannot decode the video ({exc})", frame=nxt) from exc
        raise XrcamInputError(
            self.path, f"the video ends before frame {nxt} (header says {self.num_frames} frames)", frame=nxt
        )

    def _sequential(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        self._container.seek(0)
        wanted = set(indices)
        for index, frame in enumerate(self._container.decode(self._stream)):
            if index in wanted:
                yield index, frame.to_ndarray(format=self._format)
            if index >= indices[-1]:
                return
        raise XrcamInputError(self.path, f"the video ends before frame {indices[-1]}", frame=indices[-1])

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None


class TiffStackReader(VideoReader):
    """A multi-page ``.tif``: one page per frame, pages decoded on demand."""

    def __init__(self, path: str | Path):
        import tifffile

        self.path = Path(path)
        if _size(self.path) == 0:
            raise XrcamInputError(self.path, "the TIFF file is empty (0 bytes)")
        try:
            self._tif = tifffile.TiffFile(self.path)
            pages = self._tif.pages
            self.num_frames = len(pages)
            first = pages.first
            shape, dtype = first.shape, np.dtype(first.dtype)
        except (
            Exception
        ) as exc:  # tifffile raises TiffFileError, ValueError, struct.error... on damaged files
            raise XrcamInputError(self.path, f"cannot read the TIFF stack ({exc})") from exc
        self.dtype = _check_dtype(self.path, dtype)
        self.frame_shape = _grey_shape(self.path, shape)
        self.metadata = {}

    def _frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        for index in indices:
            try:
                page = self._tif.pages[index]
                array = page.asarray()
            except Exception as exc:  # see __init__
                raise XrcamInputError(self.path, f"cannot decode the TIFF page ({exc})", frame=index) from exc
            yield index, _to_grey(array)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


class ImageFolderReader(VideoReader):
    """A folder of ``.png``/``.tif``/``.jpg`` frames, in natural file-name order.

    The original frame index is the position in that order. Every file's header is read on opening,
    so a folder of mixed frame sizes or bit depths, or an unreadable image, is reported at once.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        names = sorted(
            (
                e.name
                for e in os.scandir(self.path)
                if e.is_file()
                and not e.name.startswith(".")
                and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
            ),
            key=natural_key,
        )
        if not names:
            raise XrcamInputError(self.path, "the folder holds no .png/.tif/.jpg frame")
        self.files = [self.path / name for name in names]
        self.num_frames = len(self.files)
        headers = [_image_header(f) for f in self.files]
        self.frame_shape, self.dtype = headers[0]
        for index, (file, (shape, dtype)) in enumerate(zip(self.files, headers, strict=True)):
            if shape != self.frame_shape:
                raise XrcamInputError(
                    file,
                    f"frames of mixed sizes in one folder: this frame is {_hw(shape)}, the first is {_hw(self.frame_shape)}",
                    frame=index,
                )
            if dtype != self.dtype:
                raise XrcamInputError(
                    file,
                    f"frames of mixed bit depth in one folder: {dtype} here, {self.dtype} in the first",
                    frame=index,
                )
        self.metadata = {}

    def _frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        for index in indices:
            yield index, read_image(self.files[index], frame=index)


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise XrcamInputError(path, f"cannot read the file ({exc.strerror})") from exc


def _check_dtype(path: Path, dtype: np.dtype) -> np.dtype:
    if dtype not in (np.uint8, np.uint16):
        raise XrcamInputError(
            path, f"pixels are {dtype}; xrcam reads 8- or 16-bit unsigned grey or colour images"
        )
    return np.dtype(dtype)


def _grey_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[0] in (3, 4):
        return int(shape[1]), int(shape[2])
    raise XrcamInputError(path, f"unsupported image layout {shape}; expected grey or RGB frames")


_PIL_DTYPES = {
    "1": np.uint8,
    "L": np.uint8,
    "P": np.uint8,
    "LA": np.uint8,
    "RGB": np.uint8,
    "RGBA": np.uint8,
    "CMYK": np.uint8,
    "YCbCr": np.uint8,
    "I;16": np.uint16,
    "I;16L": np.uint16,
    "I;16B": np.uint16,
    "I": np.uint16,
}


def _image_header(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """Frame size and dtype from the file header only (no pixel decoding)."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                return _grey_shape(path, page.shape), _check_dtype(path, np.dtype(page.dtype))
        from PIL import Image

        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except XrcamInputError:
        raise
    except Exception as exc:  # PIL/tifffile raise many types for damaged files
        raise XrcamInputError(path, f"unreadable image ({exc})") from exc
    if mode not in _PIL_DTYPES:
        raise XrcamInputError(path, f"unsupported image mode {mode}; expected 8- or 16-bit grey or colour")
    return (height, width), np.dtype(_PIL_DTYPES[mode])


def read_image(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Decode one image file to a grey (H, W) uint8/uint16 array."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            array = tifffile.imread(path, key=0)
            _check_dtype(path, array.dtype)
            return _to_grey(array)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            if _PIL_DTYPES.get(im.mode) is np.uint16:
                array = np.asarray(im)
                if array.dtype != np.uint16:
                    if array.min() < 0 or array.max() > 65535:
                        raise XrcamInputError(path, "pixel values outside the 16-bit range", frame=frame)
                    array = array.astype(np.uint16)
                return array
            return np.asarray(im.convert("L"))
    except XrcamInputError:
        raise
    except Exception as exc:  # PIL/tifffile raise many types for damaged files
        raise XrcamInputError(path, f"unreadable image ({exc})", frame=frame) from exc


def open_video(path: str | Path, **options) -> VideoReader:
    """Open a video file or a folder of frames; the reader is chosen by suffix.

    ``.mkt`` -> :class:`MktReader` (option ``signed``), ``.avi``/``.mp4`` -> :class:`AvReader`,
    ``.tif``/``.tiff`` -> :class:`TiffStackReader`, a directory -> :class:`ImageFolderReader`.
    Raises :class:`XrcamInputError` naming the file when it cannot be used.
    """
    path = Path(path)
    if path.is_dir():
        return ImageFolderReader(path)
    if not path.exists():
        raise XrcamInputError(path, "no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".mkt":
        return MktReader(path, **options)
    if suffix in AV_SUFFIXES:
        return AvReader(path)
    if suffix in TIFF_SUFFIXES:
        return TiffStackReader(path)
    raise XrcamInputError(
        path,
        f"unsupported format {suffix!r}; xrcam reads {', '.join(sorted(VIDEO_SUFFIXES))} and folders of frames",
    )
