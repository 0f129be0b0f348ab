"""The Python blocks of README.md and docs/results.md run against a small real results folder.

The folder is laid out like the demo's (``demo-output/results``): a synthetic archive whose ids
look like the demo's (``meningioma/P06/V01.mkt``), explained by the real worker (random-init resnet18,
every method, no Ray) and reduced by the real reduction with every reference row. README blocks that
need a checkpoint or images are skipped (they are not about results).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["glioblastoma", "meningioma"]


def _blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text()
    if section is not None:
        start = text.index(section)
        end = text.find("\n## ", start + len(section))
        text = text[start : end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    import xrcam
    from workflows.driver import plan_shards
    from workflows.reduce import ReduceSettings, reduce_results
    from workflows.settings import RunSettings
    from workflows.store import ResultStore
    from workflows.worker import ShardWorker
    from xrcam.archive import discover_archive
    from xrcam.synth import SynthConfig, write_archive

    root = tmp_path_factory.mktemp("docs")
    archive = root / "demo-output" / "archive"
    out = root / "demo-output" / "results"
    # 6 patients per class: meningioma P01-P06 (annotated), glioblastoma P07-P12, as the demo numbers them
    config = SynthConfig(patients=6, videos=1, frames=4, size=(64, 64), seed=1, design="blobs", bit_depth=16)
    write_archive(archive, config, fmt="mkt")  # .mkt, 16-bit: ids and scaling as in the demo
    settings = RunSettings.resolve(
        None,
        archive=str(archive),
        out=str(out),
        model="resnet18",
        random_init=0,
        chunk_frames=2,
        shard_chunks=1,
    )
    settings = settings.replace(methods=tuple(xrcam.list_methods()), classes=tuple(CLASSES), batch_size=4)
    store = ResultStore.open(out, settings.store_settings(None, CLASSES))
    worker = ShardWorker(settings.to_dict(), CLASSES, str(out))
    for entry in discover_archive(archive).entries:
        layout = worker.describe(entry)["layout"]
        store.create_video(layout)
        for shard in plan_shards(entry, layout, settings.shard_frames):
            assert worker.process(shard)["error"] is None
            store.mark_done(shard.key, shard.start, shard.stop)
    store.write_summary({"videos": len(store.video_keys())})
    reduce_results(out, ReduceSettings(), workers=0)
    return root


def _run(code: str, cwd: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(cwd)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc__"})


def test_results_md_blocks_run(demo_like, monkeypatch):
    blocks = _blocks(ROOT / "docs" / "results.md")
    assert len(blocks) >= 5
    code = "\n".join(blocks)  # one session, as a reader would type them one after the other
    _run(code, demo_like, monkeypatch)
    assert (demo_like / "overlay.png").stat().st_size > 0


def test_readme_results_layout_blocks_run(demo_like, monkeypatch):
    blocks = _blocks(ROOT / "README.md", "## Results layout")
    assert blocks, "the README's Results layout section has a Python example"
    _run("\n".join(blocks), demo_like, monkeypatch)


def test_the_readme_example_group_is_in_the_demo_output():
    """The key the docs open is a test video of the demo: `xrcam demo` explains --split test only."""
    from workflows.commands.demo import SYNTH_ARGS
    from workflows.store import video_id_of_key
    from xrcam.archive import VideoEntry, split_patients

    keys = set(re.findall(r'"(meningioma__P\d+__V\d+\.mkt)"', (ROOT / "README.md").read_text()))
    keys |= set(re.findall(r'"(meningioma__P\d+__V\d+\.mkt)"', (ROOT / "docs" / "results.md").read_text()))
    assert keys
    args = shlex.split(SYNTH_ARGS)
    patients = int(args[args.index("--patients") + 1])
    entries = [
        VideoEntry(
            f"{label}/P{c * patients + p + 1:02d}/V01.mkt", Path("x"), f"P{c * patients + p + 1:02d}", label
        )
        for c, label in enumerate(("meningioma", "glioblastoma"))
        for p in range(patients)
    ]
    split = split_patients(entries, seed=0)  # the demo trains with --seed 0 and the default fractions
    for key in keys:
        patient = video_id_of_key(key).split("/")[1]
        assert split[patient] == "test", key
