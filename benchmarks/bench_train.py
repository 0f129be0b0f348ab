"""Training on the demo's synthetic archive: time to preprocess, time per epoch, and the test accuracy reached.

Generates the archive `xrcam demo` uses (mkt, 5 patients per class, 2 videos each, 24 frames, 160x160,
seed 0), trains a small model and prints measured numbers, the CPU time and the load average (the
machine may be shared: wall time alone says little then). Asserts nothing.

    .venv/bin/python benchmarks/bench_train.py                       # resnet18, 3 epochs, native crop
    .venv/bin/python benchmarks/bench_train.py --epochs 8 --image-size 64 --device cuda
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="default: the median crop side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=5, help="per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from xrcam.synth import SynthConfig, write_archive
    from xrcam.training import TrainConfig, fit, prepare_data

    print(f"torch threads {torch.get_num_threads()}, load average before {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "archive", Path(tmp) / "ckpt"
        synth = SynthConfig(
            patients=args.patients, videos=2, frames=24, size=(160, 160), bit_depth=16, seed=args.seed
        )
        write_archive(root, synth, "mkt")
        config = TrainConfig(
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            seed=args.seed,
        )
        wall, cpu = time.perf_counter(), cpu_seconds()
        data = prepare_data(root, config)
        prep_wall, prep_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        sizes = {split: len(frames) for split, frames in data.frames.items()}
        side = data.frames["train"].images.shape[-1]
        print(f"preprocess: {prep_wall:.1f} s wall, {prep_cpu:.1f} s CPU; frames {sizes}, {side}x{side} px")

        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fit(data, out, config, device=args.device, progress=False)
        fit_wall, fit_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        rows = (out / "metrics.csv").read_text().splitlines()[1:]
        for row in rows:
            epoch, _, train_acc, _, val_acc, _, seconds = row.split(",")
            print(
                f"epoch {epoch}: {float(seconds):.1f} s, train acc {float(train_acc):.3f}, val acc {float(val_acc):.3f}"
            )
        print(
            f"train+test ({args.model}, {result.epochs_run} epochs): {fit_wall:.1f} s wall, {fit_cpu:.1f} s CPU; "
            f"test accuracy {result.test_accuracy:.4f} on {result.test_frames} frames"
        )
    print(f"total {prep_wall + fit_wall:.1f} s wall; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
