"""Throughput of `xrcam run` against the bare explainer, and stored bytes per frame.

    .venv/bin/python benchmarks/bench_pipeline.py [--model resnet18] [--videos 2] [--frames 64]

Generates a synthetic 8-bit archive whose frames hold a 230x230 crop (the paper's size), then in one
process and on the same frames:

1. the bare explainer (all 7 methods x 4 layers, preprocessed frames already in memory, batches of
   ``--batch-size``) -> frames/s; measured before and after the run, averaged;
2. ``xrcam run`` through the driver on a local Ray with one worker given every core -> frames/s over
   the whole call (Ray worker start-up and model loading included) and after start-up (steady state);
   on a shared machine wall-clock ratios follow the other jobs' load, so the CPU seconds per frame
   (bare explainer process vs. the worker process, all its threads) are printed as well;
3. the store's bytes on disk divided by the frames;
4. ``xrcam run`` + ``xrcam reduce`` (in process on every core: this tree's default, one thread per
   video; the baseline's ``--workers 0``, torch's intra-op threads) on that archive, in child processes,
   with this tree and with the code of the round's starting point (commit 3e36d69, from the
   ``git worktree`` that ``bench_reduce.py`` makes at /tmp/xrcam-baseline), side by side: run and
   reduction time, their ratio, bytes per frame and files per 1,000 frames of the whole results folder.

Targets: steady-state ratio >= 0.85; reduction <= 15 % of the run; <= 100 KB per frame and <= 200
files per 1,000 frames for the whole folder. Prints the numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CROP = 230


def bare_explainer_fps(archive: Path, args, threads: int) -> tuple[float, int]:
    """Frames/s of the explainer alone on every kept frame of the archive."""
    import numpy as np
    import torch

    import xrcam
    from xrcam.archive import discover_archive
    from xrcam.io.readers import open_video
    from xrcam.preprocess import Crop, PreprocessConfig, Preprocessor

    torch.set_num_threads(threads)
    model = xrcam.load_model(args.model, num_classes=2, checkpoint=args.checkpoint)
    explainer = xrcam.create_explainer(model)
    batches = []
    for entry in discover_archive(archive).entries:
        with open_video(entry.path) as reader:
            pre = Preprocessor.for_video(reader, PreprocessConfig(frame_step=2, crop=Crop(*args.crop)))
            frames = np.stack([frame for _, frame in reader.read(0, None, 2)])
        x = pre(frames)
        batches += [x[i : i + args.batch_size].clone() for i in range(0, len(x), args.batch_size)]
    explainer(batches[0][:1])  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    for x in batches:
        exp = explainer(x)
        for layers in exp.maps.values():  # the run stores float16 on the host: count the same copy
            for value in layers.values():
                value.to(torch.float16).numpy()
    frames = sum(len(x) for x in batches)
    return frames / (time.perf_counter() - started), (time.process_time() - cpu_started) / frames, frames


def _child(archive: str, checkpoint: str, out: str, crop: str, batch_size: int) -> None:
    """xrcam run then xrcam reduce with whatever code PYTHONPATH points at (this tree or the baseline)."""
    from workflows.driver import run
    from workflows.reduce import reduce_results
    from workflows.settings import RunSettings

    settings = RunSettings.resolve(
        None, archive=archive, out=out, checkpoint=checkpoint, crop=crop, batch_size=batch_size, workers=1,
        overwrite=True,
    )  # fmt: skip
    started = time.perf_counter()
    summary = run(settings, progress=False)
    run_seconds = time.perf_counter() - started
    from workflows import reduce

    # this tree reduces in process by default (no address: threads); the baseline's in-process mode is 0
    in_process = None if hasattr(reduce, "_in_process") else 0
    started = time.perf_counter()
    reduced = reduce_results(out, workers=in_process)
    reduce_seconds = time.perf_counter() - started
    files = [p for p in Path(out).rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    print(
        json.dumps(
            {
                "frames": summary.frames_processed,
                "run_seconds": run_seconds,
                "reduce_seconds": reduce_seconds,
                "rows": reduced["rows"],
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
            }
        )
    )


def _run_and_reduce(args, archive: Path, out: Path, pythonpath: str) -> dict | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(archive),
        str(args.checkpoint),
        str(out),
    ]
    cmd += [",".join(map(str, args.crop)), str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pythonpath)
    if done.returncode:
        print(f"run+reduce with {pythonpath} failed: {done.stderr.strip()[-800:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--videos", type=int, default=2, help="videos per class (one patient each)")
    parser.add_argument("--frames", type=int, default=64, help="frames per video (every 2nd is kept)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--skip-bare", action="store_true", help="skip the bare-explainer comparison (1-3)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 3e36d69 run + reduce")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child[:4], int(args.child[4]))
        return
    size = CROP + 26
    args.crop = (13, 13, CROP)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from xrcam.synth import SynthConfig, write_archive

    work = args.out or Path(tempfile.mkdtemp(prefix="xrcam-bench-"))
    archive = work / "archive"
    if not archive.exists():
        write_archive(
            archive, SynthConfig(patients=1, videos=args.videos, frames=args.frames, size=(size, size)), "png"
        )
    cpus = os.cpu_count() or 1
    args.checkpoint = work / "model.pt"  # the same weights for every measurement
    if not args.checkpoint.exists():
        import torch

        import xrcam
        from xrcam.models import save_checkpoint

        torch.manual_seed(0)
        classes = ["glioblastoma", "meningioma"]
        save_checkpoint(
            xrcam.load_model(args.model, num_classes=2),
            args.checkpoint,
            {"model": args.model, "classes": classes},
        )

    if not args.skip_bare:
        _bare_vs_run(args, archive, work, cpus)

    repo = str(Path(__file__).resolve().parents[1])
    new = _run_and_reduce(args, archive, work / "results-new", repo)
    old = None
    if not args.no_baseline:
        from bench_reduce import BASELINE_COMMIT, BASELINE_DIR, REPO

        if not (BASELINE_DIR / "workflows").is_dir():
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(BASELINE_DIR), BASELINE_COMMIT],
                check=False,
            )
        old = _run_and_reduce(args, archive, work / "results-old", str(BASELINE_DIR))
    if new is None:
        return
    frames = new["frames"]
    print(
        f"\nxrcam run (local Ray, 1 worker) + xrcam reduce (in process), {frames} frames of {CROP} px, resnet18"
    )
    print(f"{'':34s}{'today (3e36d69)':>16s}{'new':>10s}")

    def row(label, fn, fmt):
        o = fmt.format(fn(old)) if old else "-"
        print(f"{label:34s}{o:>16s}{fmt.format(fn(new)):>10s}")

    row("run time (s)", lambda r: r["run_seconds"], "{:.1f}")
    row("reduce time (s)", lambda r: r["reduce_seconds"], "{:.1f}")
    row("reduce / run time", lambda r: r["reduce_seconds"] / r["run_seconds"], "{:.0%}")
    row("results folder KB/frame", lambda r: r["bytes"] / r["frames"] / 1000, "{:.1f}")
    row("files per 1,000 frames", lambda r: r["files"] / r["frames"] * 1000, "{:.0f}")
    print(f"({frames // (2 * args.videos)} frames per video; the per-video files are a fixed overhead)")


def _bare_vs_run(args, archive: Path, work: Path, cpus: int) -> None:
    from workflows.driver import run
    from workflows.settings import RunSettings

    bare_before, bare_cpu_before, frames = bare_explainer_fps(archive, args, cpus)
    settings = RunSettings.resolve(
        None,
        archive=str(archive),
        out=str(work / "results"),
        checkpoint=str(args.checkpoint),
        crop=",".join(map(str, args.crop)),
        batch_size=args.batch_size,
        workers=1,
        overwrite=True,
    )
    manifests = []
    summary = run(settings, progress=False, on_manifest=manifests.append)
    bare_after, bare_cpu_after, _ = bare_explainer_fps(archive, args, cpus)
    assert summary.ok and summary.frames_processed == frames, summary

    bare = (bare_before + bare_after) / 2
    bare_cpu = (bare_cpu_before + bare_cpu_after) / 2
    run_cpu = sum(m["cpu_seconds"] for m in manifests) / frames
    end_to_end = frames / summary.seconds
    steady = frames / (summary.seconds - summary.startup_seconds)
    stored = sum(p.stat().st_size for p in (work / "results" / "maps.zarr").rglob("*") if p.is_file())
    print(f"model {args.model}, {frames} frames of {CROP}x{CROP}, 7 methods x 4 layers, {cpus} CPU cores")
    print(f"bare explainer        {bare:8.2f} frames/s  (before {bare_before:.2f}, after {bare_after:.2f})")
    print(f"xrcam run, steady     {steady:8.2f} frames/s  ratio {steady / bare:.2f}  (target >= 0.85)")
    print(
        f"xrcam run, whole call {end_to_end:8.2f} frames/s  ratio {end_to_end / bare:.2f}"
        f"  (incl. {summary.startup_seconds:.1f} s worker start-up)"
    )
    print(
        f"CPU time per frame    bare {bare_cpu:.2f} s, xrcam run worker {run_cpu:.2f} s"
        f"  ratio {bare_cpu / run_cpu:.2f}  (load-independent view of the same target)"
    )
    print(f"stored                {stored / frames / 1024:8.1f} KB/frame  (maps.zarr only)")


if __name__ == "__main__":
    main()
