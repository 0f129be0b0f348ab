"""The HTML report: self-contained, tables and images present, frames reread from the archive; overlay video."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from reduce_helpers import METHODS, build_store, build_store_over_archive

from workflows.reduce import ReduceSettings, reduce_results
from workflows.report import build_report, colorize, export_overlay_video, overlay
from xrcam.errors import XrcamConfigError
from xrcam.synth import SynthConfig, write_archive


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A reduced results folder over a real synthetic archive (frames can be reread)."""
    root = tmp_path_factory.mktemp("report")
    write_archive(
        root / "archive", SynthConfig(patients=1, videos=1, frames=12, size=(96, 96), seed=3), fmt="png"
    )
    build_store_over_archive(root / "results", root / "archive")
    reduce_results(root / "results", ReduceSettings(), workers=0)
    return root / "results"


def _images(document: str) -> list[Image.Image]:
    uris = re.findall(r'<img[^>]* src="data:image/png;base64,([^"]+)"', document)
    return [Image.open(io.BytesIO(base64.b64decode(uri))) for uri in uris]


def test_report_is_self_contained_with_tables_charts_and_frame_grids(reduced, tmp_path):
    path = build_report(reduced, tmp_path / "report.html", frames=2)
    document = path.read_text()
    # nothing to fetch: no scripts, no external URLs, no linked files
    assert "<script" not in document
    assert not re.search(r'(src|href)="(?!data:)', document)
    assert "http://" not in document and "https://" not in document
    for title in ("Table 1", "Table 2", "accuracy per class", "accuracy per patient"):
        assert title in document
    assert document.count("<table>") == 4
    for method in METHODS:
        assert f"<td>{method}</td>" in document or f">{method}<" in document
    images = _images(document)
    assert len(images) == 2 + 2  # two bar charts, two frame figures
    for image in images:
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # not a blank picture
    # the frame figures show the real frame: the grey tile is not the mid-grey placeholder
    assert "could not be reread" not in document
    frame_grid = np.asarray(images[2].convert("L"))
    tile = frame_grid[44 : 44 + 112, 110 : 110 + 112]
    assert abs(float(tile.mean()) - 127.5) > 3 or tile.std() > 10


def test_report_marks_the_best_mIoU_per_column(reduced, tmp_path):
    document = build_report(reduced, tmp_path / "r.html", frames=0).read_text()
    table1 = document[document.index("Table 1") : document.index("Table 2")]
    # one best cell per metric column (ties aside): layers 1-4 and the average
    assert table1.count('class="best"') >= 5


def test_report_when_the_archive_has_moved_says_so(tmp_path):
    results = tmp_path / "results"
    build_store(results, videos=2, frames=6)
    reduce_results(results, ReduceSettings(layer_sets=("4", "4+3")), workers=0)
    document = build_report(results, frames=1).read_text()
    assert "could not be reread" in document
    assert len(_images(document)) == 3  # Table 1 chart (layer 4 only), Table 2 chart, one frame figure


def test_report_before_reduce_is_refused(tmp_path):
    build_store(tmp_path / "results", videos=1, frames=4)
    with pytest.raises(XrcamConfigError, match="xrcam reduce"):
        build_report(tmp_path / "results")


def test_colours_run_from_blue_to_red_and_overlay_keeps_the_frame():
    low, high = colorize(np.array([0.0, 1.0]))
    assert low[2] > low[0] and high[0] > high[2]
    grey = np.full((8, 8), 0.5)
    blended = overlay(grey, np.zeros((8, 8)), alpha=0.0)
    assert (blended == 128).all()


def test_overlay_video_has_every_kept_frame(reduced, tmp_path):
    import av

    from workflows.store import ResultStore

    store = ResultStore.open(reduced)
    key = store.video_keys()[0]
    group = store.video(key)
    out = export_overlay_video(reduced, key, tmp_path / "overlay.mp4", layer_set="4+3+2+1")
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == group["frame_index"].shape[0]
    size = group["gt_mask"].shape[1]
    assert frames[0].shape[:2] == (size + size % 2,) * 2
    assert (
        np.abs(frames[0][..., 0].astype(int) - frames[0][..., 2].astype(int)).mean() > 5
    )  # colour, not grey
    with pytest.raises(XrcamConfigError, match="method"):
        export_overlay_video(reduced, key, tmp_path / "x.mp4", method="nonexistent")


def test_cli_report_with_overlay_video(reduced):
    from workflows.cli import main
    from workflows.store import ResultStore

    key = ResultStore.open(reduced).video_keys()[0]
    out = CliRunner().invoke(main, ["report", str(reduced), "--frames", "1", "--overlay-video", key])
    assert out.exit_code == 0, out.output
    assert (reduced / "report.html").is_file() and (reduced / f"overlay_{key}.mp4").is_file()


def _chromium() -> str:
    """Path of a Chromium binary, installing Debian's package when it is missing (CI on a fresh machine)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
    return shutil.which("chromium")


@pytest.mark.browser
@pytest.mark.slow
def test_report_renders_in_headless_chromium(reduced, tmp_path):
    report = build_report(reduced, tmp_path / "report.html", frames=2)
    chromium = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,2400",
    ]
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", report.as_uri()],
        check=True,
        capture_output=True,
        timeout=180,
    )
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", report.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    assert dom.count("<table>") == 4 and dom.count("<img") == 4
    assert "Table 1: mIoU" in dom
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (2400, 1400)
    assert image.std() > 20  # text, tables and pictures, not a blank page
    coloured = (np.abs(image[..., 0] - image[..., 2]) > 60).mean()
    assert coloured > 0.01  # the heat-map overlays and bars were painted
    shutil.copy(shot, reduced.parent / "report_screenshot.png")  # kept beside the results for a human look
