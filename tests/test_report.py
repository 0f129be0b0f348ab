"""The HTML report: tables with CIs and reference rows, frame grids of both classes, verdicts, per-video
sections, escaping, exact overlay-video frame rates; rendered in headless Chromium from a real run."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from reduce_helpers import build_store, build_store_over_archive

from workflows.reduce import ReduceSettings, reduce_results
from workflows.report import ReportOptions, build_report, export_overlay_video, parse_fps
from workflows.report.figures import _LUT, blend, colorize
from workflows.report.sections import miou_cells, miou_table, pick_samples
from workflows.results import open as open_results
from xrcam.errors import XrcamConfigError
from xrcam.synth import SynthConfig, write_archive

EVIL = "<i>&\"q'"  # a name that must stay text


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A reduced results folder over a real synthetic archive (frames can be reread), built in process."""
    root = tmp_path_factory.mktemp("report")
    write_archive(
        root / "archive",
        SynthConfig(patients=2, videos=1, frames=8, size=(96, 96), seed=3),
        fmt="png",
    )
    build_store_over_archive(root / "results", root / "archive")
    reduce_results(root / "results", ReduceSettings(), workers=0)
    return root / "results"


def _images(document: str) -> list[tuple[str, Image.Image]]:
    found = re.findall(r'<img alt="([^"]*)" src="data:image/(?:png|webp|jpeg);base64,([^"]+)"', document)
    return [(alt, Image.open(io.BytesIO(base64.b64decode(data)))) for alt, data in found]


def _has_colour_bar(image: Image.Image, *, start: float = 0.5, tolerance: int = 60) -> bool:
    """A column of pixels (right of ``start`` x width) running down the colour map from its top to its
    bottom colour; ``tolerance``: squared RGB distance to the map's colours (lossy codecs need more)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    lut = _LUT.astype(np.int32)
    for x in range(rgb.shape[1] - 1, int(rgb.shape[1] * start) - 1, -1):
        column = rgb[:, x]
        dist = ((column[:, None, :] - lut[None]) ** 2).sum(-1)
        index, ok = dist.argmin(1), dist.min(1) < tolerance
        run = index[ok]
        if len(run) > 60 and run.max() - run.min() > 200 and np.mean(np.diff(run) <= 2) > 0.95:
            return True
    return False


# ------------------------------------------------------------------------------------------ pieces
def test_colour_map_is_perceptual_and_overlay_keeps_the_frame():
    low, high = colorize(np.array([0.0, 1.0]))
    assert low.sum() < 30 and high.sum() > 500  # inferno: near black to pale yellow
    lightness = colorize(np.linspace(0, 1, 11)).astype(float) @ [0.299, 0.587, 0.114]
    assert (np.diff(lightness) > 0).all()  # monotonic lightness: readable in grey print too
    assert (blend(np.full((8, 8), 0.5), np.zeros((8, 8)), alpha=0.0) == 128).all()


def test_miou_cells_are_bootstrapped_over_patients_and_count_only_scored_frames():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(5):
        for f in range(10):
            rows.append(
                dict(
                    method="m",
                    layer_set="1",
                    patient=f"p{p}",
                    video_key=f"v{p}",
                    position=f,
                    iou=0.1 * p + 0.01 * rng.random(),
                    has_gt_mask=True,
                    gt_empty=False,
                    correct=f != 0,
                )
            )
    rows.append(
        dict(
            method="m",
            layer_set="1",
            patient="p9",
            video_key="v9",
            position=0,
            iou=np.nan,
            has_gt_mask=False,
            gt_empty=False,
            correct=True,
        )
    )
    cells = miou_cells(pd.DataFrame(rows), ["1"])
    cell = cells.loc[("m", "1")]
    assert cell["frames"] == 45 and cell["patients"] == 5  # misclassified and unannotated frames left out
    assert cell["lo"] < cell["miou"] < cell["hi"]
    assert cell["hi"] - cell["lo"] > 10  # patients differ by 10 points: the interval is wide, not frame-level


def test_display_names_of_methods_come_from_the_registry_and_references_keep_theirs():
    from workflows.report.sections import label
    from xrcam.explain import list_methods, method_title

    assert [label(m) for m in list_methods()] == [method_title(m) for m in list_methods()]
    assert label("gradcampp") == "GradCAM++"
    assert label("oracle") == "oracle (GT pooled to the grid: ceiling)"
    assert label("inverted_xrelevancecam") == "XRelevanceCAM inverted (sign check)"
    assert label("not_a_method") == "not_a_method"


def test_paper_table_marks_the_best_method_and_keeps_references_apart():
    index = pd.MultiIndex.from_tuples(
        [("gradcam", "1"), ("xrelevancecam", "1"), ("oracle", "1"), ("random", "1")]
    )
    cells = pd.DataFrame(
        {
            "miou": [20.0, 30.0, 90.0, 5.0],
            "lo": [15.0, 25, 85, 4],
            "hi": [25.0, 35, 95, 6],
            "frames": [10] * 4,
            "patients": [3] * 4,
        },
        index=index,
    )
    text = miou_table(cells, ["gradcam", "xrelevancecam"], ["oracle", "random"], ["1"])
    assert text.count('class="best"') == 1
    assert re.search(
        r"XRelevanceCAM</th><td class=\"best\">30\.0", text
    )  # best among methods, not the oracle
    assert text.count('<tr class="ref">') == 2 and text.count(">reference<") == 2
    assert "[25.0, 35.0]" in text  # the CI in the cell


def test_samples_cover_both_classes_best_typical_worst_and_several_patients():
    rows = []
    for p in range(4):
        for f in range(5):
            rows.append(
                dict(
                    label="meningioma",
                    patient=f"m{p}",
                    iou=(p * 5 + f) / 20,
                    has_gt_mask=True,
                    gt_empty=False,
                    p_true=0.9,
                )
            )
            rows.append(
                dict(
                    label="glioblastoma",
                    patient=f"g{p}",
                    iou=np.nan,
                    has_gt_mask=False,
                    gt_empty=False,
                    p_true=(p * 5 + f) / 20,
                )
            )
    picks = pick_samples(pd.DataFrame(rows), 3, ["glioblastoma", "meningioma"])
    assert [r["label"] for _, r in picks] == ["glioblastoma"] * 3 + ["meningioma"] * 3
    meningioma = [r for _, r in picks if r["label"] == "meningioma"]
    assert meningioma[0]["iou"] > meningioma[1]["iou"] > meningioma[2]["iou"]
    assert len({r["patient"] for r in meningioma}) == 3
    assert "best by IoU" in picks[3][0] and "worst by IoU" in picks[5][0]
    assert "P(true class)" in picks[0][0]  # a class without ground truth is ranked by its probability


def test_fps_is_exact_or_refused():
    assert parse_fps("7.5") == Fraction(15, 2)
    assert parse_fps("30000/1001") == Fraction(30000, 1001)
    assert parse_fps(12) == 12
    for bad in ("0", "-3", "fast", "0.1234567"):
        with pytest.raises(XrcamConfigError):
            parse_fps(bad)


# ------------------------------------------------------------------------------------------ page
def test_report_is_self_contained_with_cis_colour_bars_both_classes_and_verdicts(reduced, tmp_path):
    path = build_report(reduced, tmp_path / "report.html", options=ReportOptions(frames=3, videos=2))
    document = path.read_text()
    assert "<script" not in document
    assert not re.search(r'(src|href)="(?!data:|#)', document)  # only embedded pictures and in-page links
    assert "http://" not in document and "https://" not in document
    assert "<title>xrcam report: archive · " in document
    for title in ("Table 1", "Table 2", "Per patient", "Per video", "Where the methods disagree"):
        assert title in document
    assert len(re.findall(r'class="ci">\[\d+\.\d, \d+\.\d\]', document)) >= 7  # a CI under every mIoU
    labels = set(re.findall(r'<figure class="sample" data-label="([^"]+)"', document))
    assert labels == {"glioblastoma", "meningioma"}
    anchors = set(re.findall(r'href="#(video-\d+)"', document))
    assert anchors and all(f'id="{a}"' in document for a in anchors)  # every verdict link has its section
    images = _images(document)
    grids = [im for alt, im in images if "Video" in alt and "frame" in alt]
    assert len(grids) >= 4
    assert all(_has_colour_bar(im) for im in grids)
    assert "could not be reread" not in document
    assert path.stat().st_size < 2_000_000


def test_report_when_the_archive_has_moved_says_so_and_escapes_names(tmp_path):
    import zarr

    write_archive(
        tmp_path / "archive", SynthConfig(patients=1, videos=1, frames=4, size=(96, 96), seed=5), fmt="png"
    )
    results = tmp_path / "results"
    build_store_over_archive(results, tmp_path / "archive")
    group = zarr.open_group(str(results / "maps.zarr"), mode="r+")
    key = open_results(results).video_keys[0]
    group[key].attrs["patient"] = EVIL
    group[key].attrs["video_id"] = f"x/{EVIL}/v.mkt"
    reduce_results(results, ReduceSettings(layer_sets=("4", "4+3")), workers=0)
    (tmp_path / "archive").rename(tmp_path / "moved")
    document = build_report(results, options=ReportOptions(frames=1, videos=2)).read_text()
    assert "could not be reread" in document
    assert EVIL not in document and "&lt;i&gt;&amp;&quot;q&#x27;" in document


def test_report_before_reduce_is_refused(tmp_path):
    build_store(tmp_path / "results", videos=1, frames=4)
    with pytest.raises(XrcamConfigError, match="xrcam reduce"):
        build_report(tmp_path / "results")


def test_cli_report_into_a_results_folder_it_cannot_write_is_a_sentence(as_nobody):
    """`xrcam report` as user nobody on a root-owned results folder: one sentence naming it, exit 1."""
    base = as_nobody.base
    write_archive(
        base / "archive", SynthConfig(patients=1, videos=1, frames=4, size=(96, 96), seed=3), fmt="png"
    )
    build_store_over_archive(base / "results", base / "archive")
    reduce_results(base / "results", ReduceSettings(), workers=0)
    subprocess.run(["chmod", "-R", "a+rX,go-w", str(base / "archive"), str(base / "results")], check=True)
    result = as_nobody.run("report", base / "results", "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"Error: {base / 'results'}") and "permission denied" in message, message
    assert not (base / "results" / "report.html").exists()


def test_overlay_video_has_every_frame_exact_fps_labels_and_colour_bar(reduced, tmp_path):
    import av

    res = open_results(reduced)
    key = res.video_keys[0]
    count = int(res.video(key).sizes["frame"])
    out = export_overlay_video(reduced, key, tmp_path / "overlay.mp4", layer_set="4+3+2+1", fps="7.5")
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert Fraction(stream.average_rate) == Fraction(15, 2)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == count
    height, width = frames[0].shape[:2]
    assert min(height, width) >= 384
    assert frames[0][:50].max() > 150  # the header text is burnt in
    assert _has_colour_bar(Image.fromarray(frames[0][60:, -90:]), start=0.0, tolerance=500)
    with pytest.raises(XrcamConfigError, match="method"):
        export_overlay_video(reduced, key, tmp_path / "x.mp4", method="nonexistent")


def test_cli_report_with_overlay_video_and_a_refused_rate(reduced):
    from workflows.cli import main

    key = open_results(reduced).video_keys[0]
    out = CliRunner().invoke(
        main,
        ["report", str(reduced), "--frames", "1", "--videos", "1", "--no-progress", "--overlay-video", key],
    )
    assert out.exit_code == 0, out.output
    assert (reduced / "report.html").is_file() and (reduced / f"overlay_{key}.mp4").is_file()
    out = CliRunner().invoke(main, ["report", str(reduced), "--overlay-video", key, "--fps", "0.1234567"])
    assert out.exit_code == 1 and "cannot be encoded exactly" in out.output


# ------------------------------------------------------------------------------------------ browser
def _chromium() -> str:
    """Path of a Chromium binary, installing Debian's package when it is missing (CI on a fresh machine)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
    return shutil.which("chromium")


_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.alt) || e)), true);
const _error = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); _error(...a); };
window.addEventListener('load', () => {
  const images = [...document.images];
  const out = {images: images.length, broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               errors: window.__errors, ci: document.querySelectorAll('.ci').length,
               labels: [...new Set([...document.querySelectorAll('figure.sample')].map(f => f.dataset.label))],
               refs: document.querySelectorAll('tr.ref').length, title: document.title};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _cli(*args: str, cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"xrcam {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def real_results(tmp_path_factory):
    """A results folder made by the real CLI: synth -> train -> run -> reduce; one patient has an HTML-ish name."""
    root = tmp_path_factory.mktemp("real")
    _cli(
        "synth",
        "archive",
        "--patients",
        "3",
        "--videos",
        "1",
        "--frames",
        "16",
        "--size",
        "160",
        "160",
        "--seed",
        "1",
        cwd=root,
    )
    manifest = pd.read_csv(root / "archive" / "manifest.csv")
    manifest.loc[manifest["patient"] == "P01", "patient"] = f"P01{EVIL}"
    manifest.to_csv(root / "archive" / "manifest.csv", index=False)
    _cli(
        "train",
        "archive/manifest.csv",
        "--out",
        "ckpt",
        "--model",
        "resnet18",
        "--epochs",
        "3",
        "--frame-step",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        cwd=root,
    )
    _cli(
        "run",
        "archive/manifest.csv",
        "--out",
        "results",
        "--checkpoint",
        "ckpt/model.pt",
        "--workers",
        "1",
        "--no-progress",
        cwd=root,
    )
    _cli("reduce", "results", "--workers", "0", cwd=root)
    return root / "results"


@pytest.mark.browser
@pytest.mark.slow
def test_report_of_a_real_run_renders_in_headless_chromium(real_results, tmp_path):
    _cli("report", str(real_results), "--no-progress", cwd=tmp_path)
    report = real_results / "report.html"
    document = report.read_text()
    assert EVIL not in document and "P01&lt;i&gt;&amp;&quot;q&#x27;" in document
    assert report.stat().st_size < 2_000_000
    probed = tmp_path / "probed.html"
    probed.write_text(document.replace("<head>", "<head>" + _PROBE, 1))
    chromium = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2400",
    ]
    run = subprocess.run(
        [
            chromium,
            *flags,
            "--virtual-time-budget=20000",
            "--enable-logging=stderr",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    probe = json.loads(
        re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S).group(1).replace("&quot;", '"')
    )
    assert probe["errors"] == [] and "Uncaught" not in run.stderr
    assert probe["images"] >= 10 and probe["broken"] == []
    assert probe["ci"] >= 7 and sorted(probe["labels"]) == ["glioblastoma", "meningioma"]
    assert probe["title"] == "xrcam report: archive/manifest.csv · resnet18"
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", report.as_uri()],
        check=True,
        capture_output=True,
        timeout=240,
    )
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.std() > 20  # text, tables and charts, not a blank page
    shutil.copy(
        shot, real_results.parent / "report_screenshot.png"
    )  # kept beside the results for a human look
    maps = [im for alt, im in _images(document) if "Video" in alt]
    assert maps and all(_has_colour_bar(im) for im in maps)


def test_axiom_table_marks_the_lowest_error_per_axiom_and_keeps_tiny_values_visible():
    from workflows.report.sections import plain_table

    df = pd.DataFrame(
        {
            "method": ["gradcam", "gradcam", "xrelevancecam", "xrelevancecam"],
            "axiom": ["conservation", "sensitivity"] * 2,
            "layer_1": [1.4, 0.5, 5.9e-08, 0.9],
            "n_frames": [2, 2, 2, 2],
        }
    )
    text = plain_table(df, best="min", group="axiom")
    assert text.count('class="best"') == 2  # one per axiom, not one per column
    assert '<td class="best">5.90e-08</td>' in text and '<td class="best">0.500</td>' in text
    assert "<td>XRelevanceCAM</td>" in text and "layer 1" in text


def test_verdicts_per_video_and_per_patient():
    import xarray as xr

    from workflows.report.sections import verdict_tables, verdicts

    def video(logits, video_id):
        return xr.Dataset(
            {"logits": (("frame", "class"), np.log(np.asarray(logits)))},
            attrs={"video_id": video_id, "patient": "P1", "label": "meningioma"},
        )

    videos = {
        "a": video([[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]], "meningioma/P1/a"),
        "b": video([[0.7, 0.3]], "meningioma/P1/b"),
    }

    class Res:
        video_keys = ["a", "b"]

        def video(self, key):
            return videos[key]

    metrics = pd.DataFrame(columns=["video_key", "iou", "has_gt_mask", "gt_empty", "correct"]).astype(
        {"iou": float, "has_gt_mask": bool, "gt_empty": bool, "correct": bool}
    )
    items = verdicts(Res(), metrics, ["glioblastoma", "meningioma"])
    assert [(v.predicted, round(v.probability, 2), v.agreement) for v in items] == [
        ("meningioma", 0.9, 1.0),
        ("glioblastoma", 0.7, 1.0),
    ]
    items[1].shown = False
    text = verdict_tables(items, "4+3+2+1", ["glioblastoma", "meningioma"])
    patient = text[text.index("Per patient") : text.index("Per video")]
    assert (
        '<td>meningioma</td><td>meningioma</td><td class="num">0.75</td><td class="num">75 %</td>' in patient
    )
    per_video = text[text.index("Per video") :]
    assert per_video.count('<tr class="wrong">') == 1  # video b's verdict is wrong
    assert 'href="#video-0"' in per_video and 'href="#video-1"' not in per_video  # no section, no link
