"""``xrcam reduce`` today vs. before the results-layer redesign, side by side in one run.

Builds the same synthetic results folder (maps are a blob plus noise at each stage's resolution,
7 methods x 4 stages, half the videos annotated on every frame) twice: once with this tree's store
writer, once with the writer of the round's starting point (commit 3e36d69, checked out with
``git worktree add /tmp/xrcam-baseline 3e36d69`` and imported with ``PYTHONPATH`` there). Both
reductions then run as child processes of this script, measured the same way: wall time from process
start to exit, and the peak of the summed RSS of the child and its descendants (read from
``/proc/PID/statm`` every 0.1 s: reading PSS from ``smaps`` cost ~30 ms of CPU per sample, a
sixth of one of the machine's two cores, which the two-thread reduction then lacked). Prints
frames/s, peak memory, bytes per frame and files per 1,000 frames of the whole results folder, for
both, and the ratios.

    .venv/bin/python benchmarks/bench_reduce.py --frames 400 --videos 4 --size 230
    .venv/bin/python benchmarks/bench_reduce.py --frames 400 --videos 4 --references ""   # methods only

Both reduce in one process on every core: this tree as a user runs it, ``xrcam reduce RESULTS``
(one thread per video, ``--workers``, default all cores; ``--workers 0``: one video at a time, one
thread), today's as its own bench's child, the library call ``reduce_results(workers=0)`` with
torch's intra-op threads (its ``xrcam reduce`` would first start a local Ray).

Targets (issue 15): >= 10x today's frames/s at 230 px; <= 100 KB per frame and <= 200 files per
1,000 frames for the whole results folder. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "relevancecam", "xrelevancecam")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
BASELINE_COMMIT = "3e36d69"
BASELINE_DIR = Path("/tmp/xrcam-baseline")
REPO = Path(__file__).resolve().parents[1]


def stage_shapes(size: int) -> dict[str, tuple[int, int]]:
    """Stage resolutions of a ResNet for a ``size`` input (strides 4, 8, 16, 32, rounded up)."""
    return {layer: (-(-size // s),) * 2 for layer, s in zip(LAYERS, (4, 8, 16, 32), strict=True)}


def build_store(root: Path, frames: int, videos: int, size: int, chunk: int, shard_chunks: int = 4, seed=0):
    """The synthetic results folder, written like ``xrcam run``'s workers write it (one call per shard)."""
    from workflows.store import ResultStore, VideoLayout

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
    shard = chunk * shard_chunks
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
            shard_frames=shard,
        )
        store.create_video(layout)
        for start in range(0, n, shard):
            c = min(shard, n - start)
            centres = rng.uniform(0.3, 0.7, size=(c, 2, 1, 1))

            def blob(layer: str, sigma: float, centres=centres) -> np.ndarray:
                yy, xx = grids[layer]
                return np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / (2 * sigma**2))

            maps = {}
            for layer in LAYERS:
                stack = np.empty((len(METHODS), c, *shapes[layer]), np.float16)
                for m in range(len(METHODS)):
                    noise = rng.normal(scale=0.05 * (m + 1), size=(c, *shapes[layer]))
                    stack[m] = (blob(layer, 0.12) + noise).astype(np.float16)
                maps[layer] = stack
            store.write_shard(
                layout.key,
                start,
                logits=rng.normal(size=(c, 2)).astype(np.float32),
                gt_mask=(blob("crop", 0.1) > 0.5).astype(np.uint8) * (label == 1),
                has_gt_mask=np.full(c, label == 1),
                maps=maps,
            )
            store.mark_done(layout.key, start, start + c)
    store.write_summary({"videos": videos})


def _child(results: str, workers: int, references: str, agreement: str) -> None:
    """``xrcam reduce`` as a user types it (this process is the command's process)."""
    from workflows.cli import main

    args = ["reduce", results, "--no-progress", "--references", references]
    if agreement != "1":
        args += ["--no-agreement", "--inverted", ""]
    if workers >= 0:
        args += ["--workers", str(workers)]
    sys.exit(main.main(args=args, prog_name="xrcam", standalone_mode=False))


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _measure(cmd: list[str], env: dict | None = None, settle: float = 0.0) -> tuple[float, int]:
    """Wall seconds (process start to exit) and peak summed RSS of ``cmd`` run as a child process,
    started after ``settle`` idle seconds (right after the other tree's run, two paired runs here were
    1.1 and 1.3 s slower than 10 s later)."""
    import psutil

    time.sleep(settle)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    proc = psutil.Process(child.pid)
    peak = 0
    while True:
        peak = max(peak, _tree_rss(proc))
        try:
            child.wait(timeout=0.1)  # returns the moment the child exits
            break
        except subprocess.TimeoutExpired:
            continue
    seconds = time.perf_counter() - t0
    if child.returncode:
        sys.exit(
            f"{' '.join(cmd[:3])} failed with exit code {child.returncode}: {child.stderr.read()[-500:]}"
        )
    return seconds, peak


def _files_and_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    return len(files), sum(p.stat().st_size for p in files)


def _baseline_tree() -> bool:
    if (BASELINE_DIR / "workflows").is_dir():
        return True
    made = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(BASELINE_DIR), BASELINE_COMMIT],
        capture_output=True,
        text=True,
    )
    if made.returncode:
        print(f"no baseline: git worktree add failed: {made.stderr.strip()}")
    return not made.returncode


def _baseline(args) -> dict[str, float] | None:
    """Today's figures: a store written by 3e36d69's own bench writer, reduced by its own bench child."""
    if not _baseline_tree():
        return None
    work = Path(tempfile.mkdtemp(prefix="bench_reduce_old_"))
    env = {**os.environ, "PYTHONPATH": str(BASELINE_DIR)}
    bench = BASELINE_DIR / "benchmarks" / "bench_reduce.py"
    build = (
        f"import sys; sys.path.insert(0, {str(bench.parent)!r}); from pathlib import Path; "
        f"from bench_reduce import build_store; build_store(Path({str(work / 'results')!r}), "
        f"{args.frames}, {args.videos}, {args.size}, {args.chunk})"
    )
    built = subprocess.run(
        [sys.executable, "-c", build], capture_output=True, text=True, env=env, cwd=BASELINE_DIR
    )
    if built.returncode:
        print(f"baseline store failed: {built.stderr.strip()[-500:]}")
        return None
    seconds, peak = _measure(
        [sys.executable, str(bench), "--child", str(work / "results"), "0"], env=env, settle=args.settle
    )
    files, size = _files_and_bytes(work / "results")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "seconds": seconds,
        "fps": args.frames / seconds,
        "peak_gib": peak / 2**30,
        "files": files,
        "bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--size", type=int, default=230, help="crop size (the paper's 230)")
    parser.add_argument("--chunk", type=int, default=32, help="frames per store chunk (xrcam run's default)")
    parser.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="videos reduced at once by threads of one process (default: all cores); 0: one at a time",
    )
    parser.add_argument(
        "--references",
        default="random,centre,oracle",
        help="reference rows (no archive behind the synthetic store, so no intensity); '' for none",
    )
    parser.add_argument(
        "--only-methods",
        action="store_true",
        help="score what today's reduction scores: no agreement table, no sign check (use with --references '')",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip today's figures")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure both N times, alternating, and print the median (and range): a shared machine's "
        "wall times vary by +-10 %% from run to run",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="idle seconds before each measured run, either tree's: a run started as the other tree's "
        "run ended was up to 1.3 s slower here",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2], args.child[3])
        return

    base = Path(tempfile.mkdtemp(prefix="bench_reduce_"))
    results = base / "results"
    build_store(results, args.frames, args.videos, args.size, args.chunk)
    runs, old_runs = [], []
    for _ in range(max(1, args.repeat)):
        seconds, peak = _measure(
            [sys.executable, __file__, "--child", str(results), str(args.workers), args.references]
            + ["0" if args.only_methods else "1"],
            settle=args.settle,
        )
        runs.append((seconds, peak))
        if not args.no_baseline:
            old_runs.append(_baseline(args))
    info = json.loads((results / "reduce.json").read_text())
    files, size = _files_and_bytes(results)
    seconds = statistics.median(r[0] for r in runs)
    new = {
        "seconds": seconds,
        "fps": args.frames / seconds,
        "peak_gib": max(r[1] for r in runs) / 2**30,
        "files": files,
        "bytes": size,
    }
    old = None
    if old_runs and all(old_runs):
        old = dict(old_runs[0])
        old["seconds"] = statistics.median(r["seconds"] for r in old_runs)
        old["fps"] = args.frames / old["seconds"]
        old["peak_gib"] = max(r["peak_gib"] for r in old_runs)
    shutil.rmtree(base, ignore_errors=True)

    threads = os.cpu_count() if args.workers < 0 else max(1, args.workers)
    mode = f"in process ({threads} thread(s) here, torch's {os.cpu_count()} intra-op threads today)"
    print(
        f"{args.frames} frames, {args.videos} videos, crop {args.size}, {len(METHODS)} methods x "
        f"{len(LAYERS)} stages x 7 layer sets, reduce {mode}, references: {args.references or 'none'}"
        f"{', no agreement/sign check' if args.only_methods else ', agreement + sign check'}; "
        f"{info['rows']} metric rows"
    )
    if args.repeat > 1:
        spread = lambda xs: f"{min(xs):.1f}-{max(xs):.1f} s"  # noqa: E731
        print(
            f"median of {args.repeat} runs each, alternating (wall time range: new "
            f"{spread([r[0] for r in runs])}"
            + (f", today {spread([r['seconds'] for r in old_runs])}" if old else "")
            + "); peak memory: the largest"
        )
    print(f"{'':28s}{'today (3e36d69)':>18s}{'new':>12s}{'ratio':>10s}")

    def line(label, key, fmt, scale=1.0, better="higher"):
        n = new[key] * scale
        if old is None:
            print(f"{label:28s}{'-':>18s}{fmt.format(n):>12s}")
            return
        o = old[key] * scale
        ratio = (n / o if better == "higher" else o / n) if o and n else float("nan")
        print(f"{label:28s}{fmt.format(o):>18s}{fmt.format(n):>12s}{ratio:>9.1f}x")

    line("reduce frames/s", "fps", "{:.1f}")
    line("reduce wall time (s)", "seconds", "{:.1f}", better="lower")
    line("peak memory (GiB, RSS)", "peak_gib", "{:.2f}", better="lower")
    new["kb_per_frame"], new["files_per_1000"] = size / args.frames / 1000, files / args.frames * 1000
    if old is not None:
        old["kb_per_frame"], old["files_per_1000"] = (
            old["bytes"] / args.frames / 1000,
            old["files"] / args.frames * 1000,
        )
    line("results folder KB/frame", "kb_per_frame", "{:.1f}", better="lower")
    line("files per 1,000 frames", "files_per_1000", "{:.0f}", better="lower")
    frames_per_video = args.frames / args.videos
    print(
        f"({frames_per_video:.0f} frames per video; per-video files are a fixed overhead, see docs/results.md)"
    )


if __name__ == "__main__":
    main()
