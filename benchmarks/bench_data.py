"""Speed of the data side: synthetic generation, reading each format, FOV detection, preprocessing.

Prints measured numbers (best of ``--repeat`` runs); asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data.py --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from timing import best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="frames per preprocessing batch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from xrcam.io import open_video
    from xrcam.preprocess import Preprocessor, detect_fov, inscribed_square
    from xrcam.synth import SynthConfig, generate_archive, generate_video, write_archive

    small = SynthConfig(classes=2, patients=3, videos=2, frames=16, size=(128, 128))
    seconds = best(lambda: generate_archive(small), args.repeat)
    print(f"generate 2x3x2 videos x 16 frames at 128x128 (in memory): {seconds:.3f} s")

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("mkt", "avi", "mp4", "png", "jpg", "tif", "tiff-stack"):
            config = SynthConfig(**{**small.__dict__, "bit_depth": 16 if fmt == "mkt" else 8})
            root = Path(tmp) / fmt
            write_s = best(lambda root=root, config=config, fmt=fmt: write_archive(root, config, fmt), 1)
            paths = [root / r.path for r in write_archive(root, config, fmt).records]

            def read_all(paths=paths):
                for path in paths:
                    with open_video(path) as reader:
                        for _ in reader.read():
                            pass

            read_s = best(read_all, args.repeat)
            frames = 16 * len(paths)
            print(
                f"{fmt:>10}: write {write_s:.3f} s, read {frames} frames {read_s:.3f} s ({frames / read_s:.0f} frames/s)"
            )

    big = SynthConfig(classes=1, patients=1, videos=1, frames=args.batch, size=(578, 576), bit_depth=16)
    video = generate_video(big, 0, 0, 0)
    seconds = best(lambda: detect_fov(video.frames[0]), args.repeat)
    print(f"FOV detection on one 576x578 frame: {seconds * 1000:.1f} ms")
    pre = Preprocessor(inscribed_square(detect_fov(video.frames[0]), (578, 576)), (578, 576), fov=video.fov)
    pre(video.frames[:2], device=args.device)  # warm-up
    seconds = best(lambda: pre(video.frames, device=args.device), args.repeat)
    print(
        f"preprocess {args.batch} 16-bit 576x578 frames -> {pre.crop.size}px crops on {args.device}: "
        f"{seconds * 1000:.1f} ms ({args.batch / seconds:.0f} frames/s)"
    )


if __name__ == "__main__":
    main()
