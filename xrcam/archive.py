"""Finding the videos of an archive, their labels, patients and ground-truth masks, and splitting by patient.

An archive is either a folder ``ROOT/<class>/<patient>/<video files or frame folders>`` or a manifest
(CSV or Parquet) with columns ``path, patient, label`` and optionally ``mask_path`` (paths relative to
the manifest's folder). Ground-truth masks of a video ``X.ext`` (or frame folder ``X/``) live in the
sibling folder ``X.masks/`` as ``frame_000123.png``, named by original frame index, unless the
manifest's ``mask_path`` says otherwise.

Discovery opens every video cheaply (header, frame count, first frame) and reports unusable files in
``Archive.problems`` instead of stopping, so one bad file never blocks an archive-scale run.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from xrcam.errors import XrcamInputError
from xrcam.io.readers import IMAGE_SUFFIXES, VIDEO_SUFFIXES, open_video

__all__ = [
    "SPLITS",
    "VideoEntry",
    "InputProblem",
    "Archive",
    "discover_archive",
    "mask_files",
    "relative_id",
    "load_masks",
    "split_patients",
]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MASKS_SUFFIX = ".masks"
_MASK_NAME = re.compile(r"^frame_(\d+)\.(png|tif|tiff|bmp)$", re.IGNORECASE)
_MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class VideoEntry:
    """One video of the archive. ``video_id`` is its path relative to the root, '/'-separated."""

    video_id: str
    path: Path
    patient: str
    label: str
    mask_path: Path | None = None
    frame_shape: tuple[int, int] | None = None  # (H, W) of its frames, set by discovery's check


@dataclass(frozen=True)
class InputProblem:
    """A file discovery could not use, and why (the message of the error it raised).

    ``path`` is the file at fault (a frame of a folder, a mask, the video itself); ``video`` is the
    video it belongs to, where there is one. ``rejected``: the video (or manifest row) is left out of
    the run; ``False`` for problems of a video that is still used (its masks, say).
    """

    path: Path
    problem: str
    frame: int | None = None
    video: Path | None = None
    rejected: bool = True

    def __str__(self) -> str:
        return str(XrcamInputError(self.path, self.problem, self.frame))


@dataclass
class Archive:
    """The usable videos (``entries``) and the files that were skipped (``problems``)."""

    root: Path
    entries: list[VideoEntry] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Sorted class labels; a label's position is its class index."""
        return sorted({e.label for e in self.entries})

    @property
    def patients(self) -> list[str]:
        return sorted({e.patient for e in self.entries})


def _masks_sibling(path: Path) -> Path | None:
    stem = path.name if path.is_dir() else path.stem
    candidate = path.with_name(stem + MASKS_SUFFIX)
    return candidate if candidate.is_dir() else None


def _normal(path: Path) -> Path:
    """``path`` with ``.`` and ``..`` removed lexically (symlinks are kept: ids follow the archive's names)."""
    return Path(os.path.normpath(path))


def relative_id(path: Path, root: Path) -> str:
    """The archive-relative, '/'-separated id of ``path`` (``..`` removed; outside ``root``: the path)."""
    path, root = _normal(path), _normal(root)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix().lstrip("/")


def _identity(path: Path) -> Path:
    """What makes two listed paths the same video: the real file, all symlinks and ``..`` resolved."""
    try:
        return path.resolve()
    except OSError:  # a symlink loop: the lexical form is the best we have
        return _normal(path.absolute())


def _walk_layout(root: Path, archive: Archive) -> list[VideoEntry]:
    entries: list[VideoEntry] = []
    seen: dict[Path, str] = {}
    for class_dir in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not class_dir.is_dir():
            continue  # files beside the class folders (a manifest, a README) are not videos
        for patient_dir in sorted(p for p in class_dir.iterdir() if not p.name.startswith(".")):
            if not patient_dir.is_dir():
                if patient_dir.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
                    archive.problems.append(
                        InputProblem(
                            patient_dir, "not inside a patient folder (ROOT/<class>/<patient>/); skipped"
                        )
                    )
                continue
            loose = []
            for item in sorted(p for p in patient_dir.iterdir() if not p.name.startswith(".")):
                is_frame_folder = item.is_dir() and not item.name.endswith(MASKS_SUFFIX)
                if is_frame_folder or (item.is_file() and item.suffix.lower() in VIDEO_SUFFIXES):
                    identity, video_id = _identity(item), relative_id(item, root)
                    if identity in seen:
                        archive.problems.append(
                            InputProblem(
                                item,
                                f"the same video as {seen[identity]} (a link to it); skipped so its "
                                "frames count once",
                            )
                        )
                        continue
                    seen[identity] = video_id
                    entries.append(
                        VideoEntry(
                            relative_id(item, root),
                            item,
                            patient_dir.name,
                            class_dir.name,
                            _masks_sibling(item),
                        )
                    )
                elif item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
                    loose.append(item)
            if loose:
                archive.problems.append(
                    InputProblem(
                        patient_dir,
                        f"{len(loose)} loose image files in a patient folder; put each video's frames in a folder of their own",
                    )
                )
    return entries


def _read_manifest(manifest: Path) -> list[dict[str, str]]:
    try:
        if manifest.suffix.lower() == ".csv":
            with open(manifest, newline="") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                columns = set(reader.fieldnames or ())
        else:
            import pandas as pd

            frame = pd.read_parquet(manifest)
            columns = set(frame.columns)
            rows = frame.astype(object).where(frame.notna(), "").astype(str).to_dict("records")
    except XrcamInputError:
        raise
    except Exception as exc:  # csv, pandas and pyarrow raise many types for damaged files
        raise XrcamInputError(manifest, f"cannot read the manifest ({exc})") from exc
    missing = {"path", "patient", "label"} - columns
    if missing:
        raise XrcamInputError(
            manifest,
            f"the manifest lacks the column(s) {', '.join(sorted(missing))}; it needs path, patient, label[, mask_path]",
        )
    return rows


def _from_manifest(manifest: Path, archive: Archive) -> list[VideoEntry]:
    root = manifest.parent
    entries: list[VideoEntry] = []
    seen: dict[Path, int] = {}
    for line, row in enumerate(_read_manifest(manifest), start=2):
        raw = (row.get("path") or "").strip()
        patient, label = (row.get("patient") or "").strip(), (row.get("label") or "").strip()
        if not raw or not patient or not label:
            archive.problems.append(
                InputProblem(manifest, f"row {line}: path, patient and label must all be set; row skipped")
            )
            continue
        path = _normal(Path(raw) if Path(raw).is_absolute() else root / raw)
        identity = _identity(path)
        if identity in seen:
            archive.problems.append(
                InputProblem(
                    path,
                    f"row {line} of {manifest.name} lists the same video as row {seen[identity]}; "
                    "the later row is skipped",
                )
            )
            continue
        seen[identity] = line
        mask_raw = (row.get("mask_path") or "").strip()
        mask = (
            (Path(mask_raw) if Path(mask_raw).is_absolute() else root / mask_raw)
            if mask_raw
            else _masks_sibling(path)
        )
        if mask is not None and not mask.is_dir():
            archive.problems.append(
                InputProblem(
                    mask,
                    f"mask folder of {raw} not found; the video is used without masks",
                    video=path,
                    rejected=False,
                )
            )
            mask = None
        entries.append(VideoEntry(relative_id(path, root), path, patient, label, mask))
    return entries


def mask_files(mask_path: Path) -> dict[int, Path]:
    """Original frame index -> mask file, for the ``frame_NNNNNN.png`` files of a mask folder."""
    out = {}
    for item in mask_path.iterdir():
        match = _MASK_NAME.match(item.name)
        if match and item.is_file():
            out[int(match.group(1))] = item
    return dict(sorted(out.items()))


def _check(entry: VideoEntry) -> tuple[VideoEntry | None, list[InputProblem]]:
    """Open the video (header, count, first frame) and the mask headers; report what is unusable."""
    try:
        with open_video(entry.path) as reader:
            next(reader.read(0, 1))
            shape, count = reader.frame_shape, reader.num_frames
    except XrcamInputError as exc:  # the error names the file at fault: the video or one of its frames
        return None, [InputProblem(Path(exc.path), exc.problem, exc.frame, entry.path)]
    except OSError as exc:
        return None, [InputProblem(entry.path, f"cannot read ({exc})", video=entry.path)]
    entry = replace(entry, frame_shape=tuple(int(v) for v in shape))
    if entry.mask_path is None:
        return entry, []
    from PIL import Image

    problems = []
    for index, file in mask_files(entry.mask_path).items():
        try:
            with Image.open(file) as im:
                size = im.size[::-1]
        except Exception as exc:  # PIL raises many types for damaged files
            problem = f"unreadable mask ({exc})"
        else:
            if size != shape:
                problem = f"mask is {size[1]}x{size[0]} but its video's frames are {shape[1]}x{shape[0]}"
            elif index >= count:
                problem = f"mask for frame {index} but the video has {count} frames"
            else:
                continue
        problems.append(InputProblem(file, problem, index, entry.path, rejected=False))
    if problems:  # one bad mask makes the folder suspect: the video is used without ground truth
        suffix = "; the video's masks are not used (it is explained without ground truth)"
        problems = [replace(p, problem=p.problem + suffix) for p in problems]
        entry = replace(entry, mask_path=None)
    return entry, problems


def discover_archive(source: str | Path, *, check: bool = True, workers: int = 4) -> Archive:
    """Find the videos of a folder archive or a manifest (``.csv``/``.parquet``).

    With ``check`` (default), every video is opened and its first frame decoded, and mask sizes
    are compared with the frames, using ``workers`` threads; unusable files go to ``problems``.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() in _MANIFEST_SUFFIXES:
        archive = Archive(source.parent)
        entries = _from_manifest(source, archive)
    elif source.is_dir():
        archive = Archive(source)
        entries = _walk_layout(source, archive)
    else:
        raise XrcamInputError(
            source, "not an archive: give a folder ROOT/<class>/<patient>/... or a .csv/.parquet manifest"
        )
    if check:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = list(pool.map(_check, entries))
        entries = []
        for entry, problems in results:
            archive.problems.extend(problems)
            if entry is not None:
                entries.append(entry)
    archive.entries = sorted(entries, key=lambda e: e.video_id)
    for problem in archive.problems:
        log.warning("skipped %s", problem)
    return archive


def load_masks(entry: VideoEntry, frame_shape: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """Original frame index -> (H, W) bool ground-truth mask, for every annotated frame of ``entry``.

    Raises :class:`XrcamInputError` naming the mask file when it cannot be read or its size differs
    from the video's frames (``frame_shape``; read from the video header when not given).
    """
    if entry.mask_path is None:
        return {}
    from PIL import Image

    if frame_shape is None:
        with open_video(entry.path) as reader:
            frame_shape = reader.frame_shape
    masks = {}
    for index, file in mask_files(entry.mask_path).items():
        try:
            with Image.open(file) as im:
                mask = np.asarray(im.convert("L")) > 0
        except Exception as exc:  # PIL raises many types for damaged files
            raise XrcamInputError(file, f"unreadable mask ({exc})", frame=index) from exc
        if mask.shape != tuple(frame_shape):
            raise XrcamInputError(
                file,
                f"mask is {mask.shape[1]}x{mask.shape[0]} but its frame is {frame_shape[1]}x{frame_shape[0]}",
                frame=index,
            )
        masks[index] = mask
    return masks


_PRIORITY = (2, 1, 0)  # test, val, train: an evaluation needs a test patient of each class most


def _split_counts(sizes: list[int], fractions: np.ndarray) -> np.ndarray:
    """Patients per (class, split): stratified largest-remainder rounding with coverage rules.

    Ties in the rounding go to the split that is globally furthest below its share, so the totals
    follow ``fractions``. Each class then gives every requested split one patient (test first, then
    val) while another split of that class keeps two or more; finally every requested split still
    empty overall takes one patient from the largest split.
    """
    requested = [i for i in _PRIORITY if fractions[i] > 0]
    counts = np.zeros((len(sizes), 3), dtype=int)
    seen = 0
    for c, n in enumerate(sizes):
        seen += n
        raw = n * fractions
        row = np.floor(raw).astype(int)
        deficit = seen * fractions - counts.sum(axis=0) - row
        for i in np.lexsort((-deficit, -(raw - row)))[: n - row.sum()]:
            row[i] += 1
        for i in requested:
            if row[i] == 0 and row.max() > 1:
                row[int(np.argmax(row))] -= 1
                row[i] += 1
        counts[c] = row
    for i in requested:
        totals = counts.sum(axis=0)
        if totals[i] == 0:
            donor = max((j for j in _PRIORITY if totals[j] > 1), key=lambda j: totals[j], default=None)
            if donor is not None:
                c = int(np.argmax(counts[:, donor]))
                counts[c, donor] -= 1
                counts[c, i] += 1
    return counts


def split_patients(
    entries: Iterable[VideoEntry], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, str]:
    """Assign every patient to ``"train"``, ``"val"`` or ``"test"`` (never two), reproducibly from ``seed``.

    ``fractions`` are of patients (train, val, test); a 0 leaves that split empty. The split is
    stratified by class: patients are shuffled within each class and every requested split gets at
    least one patient of each class that has enough patients, so a test split always has ground
    truth to score where the archive allows (see :func:`_split_counts`). A patient found under
    several classes forms a stratum of its own and is never split.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test), got {tuple(fractions)}"
        )
    fractions = fractions / fractions.sum()
    labels: dict[str, set[str]] = {}
    for entry in entries:
        labels.setdefault(entry.patient, set()).add(entry.label)
    strata: dict[tuple[str, ...], list[str]] = {}
    for patient in sorted(labels):
        strata.setdefault(tuple(sorted(labels[patient])), []).append(patient)
    groups = [group for _, group in sorted(strata.items())]
    rng = np.random.default_rng(seed)
    out = {}
    for group, (n_train, n_val, n_test) in zip(
        groups, _split_counts([len(g) for g in groups], fractions), strict=True
    ):
        shuffled = [group[i] for i in rng.permutation(len(group))]
        out.update(zip(shuffled, ["test"] * n_test + ["val"] * n_val + ["train"] * n_train, strict=True))
    return out
