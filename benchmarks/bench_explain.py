"""Throughput of the explainer against one plain forward+backward pass, and its peak memory.

Prints frames/s for skresnext50_32x4d (random weights), batch 8, 230x230, on this machine's CPU:
  plain      forward + backward with every parameter requiring grad (a training step without the update)
  xrelcam    XRelevanceCAM at layer1..layer4 (one forward, one LRP backward)
  all7       all seven methods at layer1..layer4 (one forward, one gradient and one LRP backward)
(fastest of ``--repeats`` interleaved rounds) and the ratios to ``plain`` (targets: xrelcam <= 1.3x, all7 <= 2.0x the plain pass's time).
Then the peak resident memory of each at batch 32, each measured in a fresh subprocess.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_explain.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch

import xrcam

MODEL, SIZE = "skresnext50_32x4d", 230


def _runner(kind: str, model: torch.nn.Module):
    if kind == "plain":
        params = [p for p in model.parameters() if p.requires_grad]

        def plain(x: torch.Tensor) -> None:
            torch.autograd.grad(model(x).sum(), params)

        return plain
    methods = ["xrelevancecam"] if kind == "xrelcam" else xrcam.list_methods()
    return xrcam.create_explainer(model, methods=methods)


def _time(runners: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` interleaved rounds per runner: on a shared machine the minimum is the
    least disturbed measurement, and interleaving exposes every runner to the same load."""
    for fn in runners.values():
        fn(x)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {kind: [] for kind in runners}
    for _ in range(repeats):
        for kind, fn in runners.items():
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - start)
    return {kind: min(t) for kind, t in times.items()}


def _peak(kind: str, batch: int, device: str) -> None:
    """Run one call at ``batch`` and print the process's peak RSS (MiB) or the CUDA peak."""
    torch.manual_seed(0)
    model = xrcam.load_model(MODEL, num_classes=2, device=device)
    x = torch.randn(batch, 3, SIZE, SIZE, device=device)
    _runner(kind, model)(x)
    if device.startswith("cuda"):
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--peak-batch", type=int, default=32, help="0 skips the peak-memory runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak", choices=("plain", "xrelcam", "all7"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        _peak(args.peak, args.peak_batch, args.device)
        return

    # Peaks first, while this process is still small: Linux carries a parent's peak RSS into its children.
    peaks = {}
    for kind in ("plain", "xrelcam", "all7") if args.peak_batch else ():
        cmd = [
            sys.executable,
            __file__,
            "--peak",
            kind,
            "--peak-batch",
            str(args.peak_batch),
            "--device",
            args.device,
        ]
        peaks[kind] = float(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1]
        )

    torch.manual_seed(0)
    model = xrcam.load_model(MODEL, num_classes=2, device=args.device)
    x = torch.randn(args.batch, 3, SIZE, SIZE, device=args.device)
    print(
        f"{MODEL}, batch {args.batch}, {SIZE}x{SIZE}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    seconds = _time({kind: _runner(kind, model) for kind in ("plain", "xrelcam", "all7")}, x, args.repeats)
    for kind, s in seconds.items():
        print(
            f"{kind:8s} {args.batch / s:7.2f} frames/s  {s:7.3f} s/batch  ratio to plain {s / seconds['plain']:.2f}x"
        )
    for kind, peak in peaks.items():
        print(f"peak memory at batch {args.peak_batch}, {kind:8s} {peak:8.0f} MiB")


if __name__ == "__main__":
    main()
