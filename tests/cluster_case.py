"""The small job both cluster tests submit, and its reference result from a plain local `xrcam run`.

Built once per pytest session (memoised in the session's base temp dir), so the SLURM and the Ray
Jobs tests share one reference run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["XRCAM", "cluster_case", "maps", "assert_same_maps"]

XRCAM = str(Path(sys.executable).parent / "xrcam")


def maps(results: Path) -> dict[str, np.ndarray]:
    """Every array of ``results/maps.zarr`` (root coordinates and every video group), by its path."""
    import zarr

    root = zarr.open_group(results / "maps.zarr", mode="r")
    return {
        path: np.asarray(node[...])
        for path, node in root.members(max_depth=None)
        if isinstance(node, zarr.Array)
    }


def assert_same_maps(results: Path, reference: dict[str, np.ndarray]) -> None:
    """``results`` holds every array of the reference run, equal to the bit, plus `xrcam reduce`'s output."""
    ours = maps(results)
    assert reference and ours.keys() >= reference.keys()
    for name, expected in reference.items():
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    assert (results / "metrics").is_dir() and (results / "summary").is_dir()  # `xrcam reduce` ran too


def cluster_case(tmp_path_factory) -> dict:
    """A tiny archive in a folder with a space, seeded weights, the `xrcam run` options, the local result."""
    root = tmp_path_factory.getbasetemp() / "cluster case"
    archive, local = root / "my archive", root / "local results"
    checkpoint = root / "model.pt"
    run_args = [
        "--model",
        "resnet18",
        "--checkpoint",
        str(checkpoint),
        "--classes",
        "glioblastoma,meningioma",
    ]
    run_args += ["--methods", "gradcam,xrelevancecam"]
    run_args += ["--workers", "1", "--batch-size", "4", "--no-progress"]
    if not (root / "done").exists():
        import torch

        from xrcam.models import load_model, save_checkpoint
        from xrcam.synth import SynthConfig, write_archive

        root.mkdir(exist_ok=True)
        write_archive(archive, SynthConfig(patients=1, videos=1, frames=4, size=(64, 64), seed=3))
        torch.manual_seed(0)
        save_checkpoint(load_model("resnet18", num_classes=2), checkpoint)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([XRCAM, "run", str(archive), "--out", str(local), *run_args], env=env, check=True)
        (root / "done").touch()
    return {"root": root, "archive": archive, "run_args": run_args, "local": maps(local)}
