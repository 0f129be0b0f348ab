"""Peak memory and time of ``xrcam reduce`` on a synthetic results folder of many frames.

The store is written directly with :mod:`workflows.store` (maps are a blob plus noise at each stage's
resolution), so no explanations have to be computed on the CPU. The reduction then runs in a child
process; the script samples the memory of that child and all its descendants (Ray's raylet, GCS and
workers included) and prints the peak of their summed PSS (proportional set size: shared library
pages such as torch's are counted once, not once per process), the peak RSS of the largest single
process, the wall time and the disk size of what reduction wrote.

    .venv/bin/python benchmarks/bench_reduce.py --frames 10000 --workers 0   # in-process
    .venv/bin/python benchmarks/bench_reduce.py --frames 10000 --workers 2   # local Ray
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "relevancecam", "xrelevancecam")
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def stage_shapes(size: int) -> dict[str, tuple[int, int]]:
    """Stage resolutions of a ResNet for a ``size`` input (strides 4, 8, 16, 32, rounded up)."""
    return {layer: (-(-size // s),) * 2 for layer, s in zip(LAYERS, (4, 8, 16, 32), strict=True)}


def build_store(root: Path, frames: int, videos: int, size: int, chunk: int, seed: int = 0) -> None:
    from workflows.store import ResultStore, VideoLayout, map_name

    rng = np.random.default_rng(seed)
    shapes = stage_shapes(size)
    settings = {
        "archive": str(root / "archive"),
        "model": "skresnext50_32x4d",
        "classes": ["glioblastoma", "meningioma"],
        "methods": list(METHODS),
        "layers": list(LAYERS),
        "rules": "reference",
        "clrp": "unit",
        "chunk_frames": chunk,
    }
    store = ResultStore.open(root, settings, overwrite=True)
    per_video = [frames // videos + (v < frames % videos) for v in range(videos)]
    grids = {layer: np.mgrid[0:h, 0:w] / h for layer, (h, w) in {**shapes, "crop": (size, size)}.items()}
    for v, n in enumerate(per_video):
        label = v % 2
        layout = VideoLayout(
            video_id=f"class{label}/patient{v % 17}/video{v:04d}.mkt",
            path=str(root / "archive" / f"video{v:04d}.mkt"),
            patient=f"patient{v % 17}",
            label=settings["classes"][label],
            label_index=label,
            crop=(0, 0, size),
            frame_step=2,
            num_source_frames=2 * n,
            num_classes=2,
            map_shapes=shapes,
        )
        store.create_video(layout)
        for start in range(0, n, chunk):  # write chunk by chunk: the builder stays small too
            c = min(chunk, n - start)
            centres = rng.uniform(0.3, 0.7, size=(c, 2, 1, 1))

            def blob(layer: str, sigma: float, centres=centres) -> np.ndarray:
                yy, xx = grids[layer]
                return np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / (2 * sigma**2))

            logits = rng.normal(size=(c, 2)).astype(np.float32)
            probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            arrays = {
                "frame_index": np.arange(2 * start, 2 * (start + c), 2),
                "logits": logits,
                "probabilities": probabilities,
                "predicted": logits.argmax(1),
                "gt_mask": (blob("crop", 0.1) > 0.5).astype(np.uint8) * (label == 1),
                "has_gt_mask": np.full(c, label == 1),
            }
            for m, method in enumerate(METHODS):
                for layer in LAYERS:
                    noise = rng.normal(scale=0.05 * (m + 1), size=(c, *shapes[layer]))
                    arrays[map_name(method, layer)] = (blob(layer, 0.12) + noise).astype(np.float16)
            store.write(layout.key, start, arrays)
        store.mark_done(layout.key, 0, n)


def _child(results: str, workers: int) -> None:
    from workflows.reduce import reduce_results

    summary = reduce_results(results, workers=workers)
    print(json.dumps({"rows": summary["rows"], "videos": summary["videos"]}))


def _tree_memory(proc) -> tuple[int, int]:
    """Summed PSS and the largest RSS of ``proc`` and all its descendants (bytes)."""
    import psutil

    total = largest = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        total += info.pss
        largest = max(largest, info.rss)
    return total, largest


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--size", type=int, default=230, help="crop size (the paper's 230)")
    parser.add_argument("--chunk", type=int, default=32, help="frames per store chunk (xrcam run's default)")
    parser.add_argument(
        "--workers", type=int, default=0, help="0: reduce in process; N: local Ray with N CPUs"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build the store (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--child", nargs=2, metavar=("RESULTS", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return

    import psutil

    base = args.dir or Path(tempfile.mkdtemp(prefix="bench_reduce_"))
    results = base / "results"
    t0 = time.perf_counter()
    build_store(results, args.frames, args.videos, args.size, args.chunk)
    built = time.perf_counter() - t0
    maps_bytes = _du(results / "maps.zarr")
    print(
        f"built store: {args.frames} frames, {args.videos} videos, crop {args.size}, "
        f"{len(METHODS)} methods x {len(LAYERS)} layers, {maps_bytes / 2**20:.0f} MiB, {built:.0f} s"
    )

    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", str(results), str(args.workers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    proc = psutil.Process(child.pid)
    peak_total = peak_single = 0
    while child.poll() is None:
        total, largest = _tree_memory(proc)
        peak_total, peak_single = max(peak_total, total), max(peak_single, largest)
        time.sleep(0.25)
    out = child.stdout.read()
    elapsed = time.perf_counter() - t0
    if child.returncode:
        sys.exit(f"reduction failed with exit code {child.returncode}")
    info = json.loads(out.strip().splitlines()[-1])
    written = _du(results / "maps.zarr") - maps_bytes
    mode = "in process" if args.workers == 0 else f"local Ray, {args.workers} workers"
    print(
        f"reduce ({mode}): {info['videos']} videos, {info['rows']} rows, {elapsed:.0f} s "
        f"({args.frames / elapsed:.0f} frames/s)"
    )
    print(f"peak memory, reduction process tree (summed PSS): {peak_total / 2**30:.2f} GiB")
    print(f"peak RSS, largest single process:                {peak_single / 2**30:.2f} GiB")
    print(
        f"written: {written / 2**20:.0f} MiB of maps and masks, "
        f"{_du(results / 'metrics') / 2**20:.1f} MiB of Parquet metrics"
    )
    if not args.keep and args.dir is None:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
