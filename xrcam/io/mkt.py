"""Cellvizio ``.mkt`` raw recordings: our own reader and writer, from the layout in SPEC §1.

Layout: a 16-byte header whose bytes 10–13 hold the frame size in bytes (big-endian int32), then
frames of raw little-endian 16-bit pixels, each followed by a 32-byte gap, then (in newer files) an
ASCII ``key=value`` block that ends with ``<CEND``. The writer exists so the synthetic generator and the
tests can produce files with exactly this layout.

The metadata block may hold ``patient_id`` and other identifying values. They are parsed only to be
dropped: :func:`public_metadata` is the only view the rest of xrcam gets, and nothing here logs them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from xrcam.errors import XrcamInputError

__all__ = [
    "HEADER_BYTES",
    "GAP_BYTES",
    "END_MARK",
    "MktLayout",
    "read_layout",
    "iter_mkt_frames",
    "write_mkt",
    "parse_metadata",
    "public_metadata",
    "is_identifying_key",
]

HEADER_BYTES = 16
GAP_BYTES = 32
END_MARK = b"<CEND"
_SIZE_FIELD = slice(10, 14)
# Pixel counts of the geometries Cellvizio is known to write, for files without a metadata block.
_KNOWN_GEOMETRIES = {
    576 * 578: (578, 576),
    576 * 580: (580, 576),
    576 * 576: (576, 576),
    512 * 512: (512, 512),
}
# A metadata key is identifying if it names the patient or a person; such keys never leave this module.
_MAX_BLOCK = 1 << 16  # longest trailing metadata block searched for
_IDENTIFYING = re.compile(r"patient|name|birth|dob|operator|physician|surgeon|doctor|user", re.IGNORECASE)


def is_identifying_key(key: str) -> bool:
    """True for metadata keys that may identify a person (``patient_id``, names, birth dates, ...)."""
    return bool(_IDENTIFYING.search(key))


def parse_metadata(block: bytes) -> dict[str, str]:
    """Parse a ``key=value`` block (newline or ``;`` separated, ending with ``<CEND``) into a dict.

    Returns every key, identifying ones included; callers outside this module use
    :func:`public_metadata` instead.
    """
    text = block.split(END_MARK, 1)[0].decode("latin-1")
    out: dict[str, str] = {}
    for item in re.split(r"[\r\n;\x00]+", text):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def public_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata without identifying keys (see :func:`is_identifying_key`)."""
    return {k: v for k, v in metadata.items() if not is_identifying_key(k)}


class MktLayout:
    """Where the frames of one ``.mkt`` file are, found from the header and the file size alone."""

    def __init__(self, path: Path, frame_bytes: int, num_frames: int, shape: tuple[int, int], metadata: dict):
        self.path = path
        self.frame_bytes = frame_bytes
        self.num_frames = num_frames
        self.shape = shape
        self.metadata = public_metadata(metadata)

    @property
    def stride(self) -> int:
        return self.frame_bytes + GAP_BYTES

    def offset(self, index: int) -> int:
        return HEADER_BYTES + index * self.stride


def _metadata_tail(path: Path, size: int, remainder: int, stride: int) -> bytes | None:
    """The trailing ``key=value`` block, or None if the bytes after the last whole frame are not one.

    The block's length is ``remainder`` plus a whole number of strides; the longest candidate that
    is printable ASCII ending in ``<CEND`` wins (frame data and the zero gap before the block never are).
    """
    longest = min(size - HEADER_BYTES, _MAX_BLOCK)
    with open(path, "rb") as fh:
        fh.seek(size - longest)
        tail = fh.read(longest)
    body = tail.rstrip(b"\x00\r\n\t ")
    if not body.endswith(END_MARK):
        return None
    codes = np.frombuffer(body, dtype=np.uint8)
    printable = ((codes >= 0x20) & (codes <= 0x7E)) | np.isin(codes, (9, 10, 13))
    bad = np.flatnonzero(~printable)
    usable = len(tail) - (int(bad[-1]) + 1 if bad.size else 0)
    if usable < remainder:
        return None
    length = remainder + (usable - remainder) // stride * stride
    if length < len(tail) - len(body) + len(END_MARK):
        return None
    return tail[len(tail) - length :]


def read_layout(path: str | Path) -> MktLayout:
    """Read the header and the trailing metadata block; check that the file holds whole frames.

    Raises :class:`XrcamInputError` for a file too short for its header, an impossible frame size,
    or a last frame cut short (a truncated copy).
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header = fh.read(HEADER_BYTES)
    except OSError as exc:
        raise XrcamInputError(
            path, f"cannot read the file ({exc.strerror}); check that it exists and is readable"
        ) from exc
    if len(header) < HEADER_BYTES:
        raise XrcamInputError(path, f"truncated .mkt: {size} bytes, shorter than the 16-byte header")
    frame_bytes = int.from_bytes(header[_SIZE_FIELD], "big", signed=True)
    if frame_bytes <= 0 or frame_bytes % 2:
        raise XrcamInputError(
            path, f"not a Cellvizio .mkt file: header gives a frame size of {frame_bytes} bytes"
        )
    stride = frame_bytes + GAP_BYTES
    num_frames, remainder = divmod(size - HEADER_BYTES, stride)
    block = _metadata_tail(path, size, remainder, stride)
    if block is not None:
        num_frames = (size - HEADER_BYTES - len(block)) // stride
    elif remainder:
        raise XrcamInputError(
            path,
            f"truncated .mkt: the last frame has {remainder} of {stride} bytes "
            f"({num_frames} whole frames); re-copy the file from the acquisition system",
        )
    if num_frames == 0:
        raise XrcamInputError(path, "the .mkt file holds no frame")
    metadata = parse_metadata(block) if block is not None else {}
    shape = _geometry(path, frame_bytes, metadata)
    return MktLayout(path, frame_bytes, num_frames, shape, metadata)


def _geometry(path: Path, frame_bytes: int, metadata: Mapping[str, str]) -> tuple[int, int]:
    pixels = frame_bytes // 2
    try:
        height, width = int(metadata["height"]), int(metadata["width"])
    except (KeyError, ValueError):
        if pixels in _KNOWN_GEOMETRIES:
            return _KNOWN_GEOMETRIES[pixels]
        side = int(round(pixels**0.5))
        if side * side == pixels:
            return side, side
        raise XrcamInputError(
            path,
            f"frame geometry unknown: {pixels} pixels per frame and no width/height in the metadata block",
        ) from None
    if height * width != pixels:
        raise XrcamInputError(
            path, f"metadata says {width}x{height} pixels but the header says {pixels} pixels per frame"
        )
    return height, width


def _to_unsigned(raw: np.ndarray, signed: bool | None) -> np.ndarray:
    """Read pixels as signed or unsigned 16-bit and return uint16 with negatives clipped to 0.

    ``signed=None`` decides per frame: values at or above 0x8000 that all lie in the top eighth
    (0xF000 and up) and are not all 0xFFFF are small negatives of a signed file (dark-level
    subtraction); otherwise the file is unsigned and such values are genuine bright pixels
    (0xFFFF alone is read as unsigned saturation, not as -1).
    """
    if signed is None:
        high = raw[raw >= 0x8000]
        signed = high.size > 0 and 0xF000 <= int(high.min()) < 0xFFFF
    if signed:
        return np.clip(raw.view("<i2"), 0, None).astype(np.uint16)
    return raw.astype(np.uint16, copy=False)


def iter_mkt_frames(
    layout: MktLayout, indices: range, signed: bool | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, frame)`` for the given frame indices, reading only those frames."""
    height, width = layout.shape
    with open(layout.path, "rb") as fh:
        for index in indices:
            fh.seek(layout.offset(index))
            data = fh.read(layout.frame_bytes)
            if len(data) != layout.frame_bytes:
                raise XrcamInputError(
                    layout.path,
                    "truncated .mkt: the frame ends early (file changed while reading?)",
                    frame=index,
                )
            raw = np.frombuffer(data, dtype="<u2").reshape(height, width)
            yield index, _to_unsigned(raw, signed)


def write_mkt(
    path: str | Path, frames: np.ndarray, metadata: Mapping[str, str] | None = None, *, signed: bool = False
) -> Path:
    """Write ``frames`` (T, H, W) as an ``.mkt`` file, with a ``key=value`` block when ``metadata`` is given.

    ``width`` and ``height`` are always written first in the block. With ``signed=True`` the pixels
    are stored as int16 (values must be below 32768), the convention some acquisition software uses.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (T, H, W), got shape {frames.shape}")
    if frames.size and (
        frames.min() < (-32768 if signed else 0) or frames.max() > (32767 if signed else 65535)
    ):
        raise ValueError("pixel values do not fit the 16-bit range of an .mkt file")
    t, height, width = frames.shape
    frame_bytes = height * width * 2
    header = bytearray(HEADER_BYTES)
    header[_SIZE_FIELD] = frame_bytes.to_bytes(4, "big", signed=True)
    pixels = frames.astype("<i2" if signed else "<u2")
    gap = bytes(GAP_BYTES)
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(header)
        for frame in pixels:
            fh.write(frame.tobytes())
            fh.write(gap)
        if metadata is not None:
            items = {"width": str(width), "height": str(height), **{k: str(v) for k, v in metadata.items()}}
            fh.write("".join(f"{k}={v}\n" for k, v in items.items()).encode("ascii") + END_MARK)
    return path
