"""``xrcam report``: a self-contained HTML report of a reduced results folder, and overlay videos.

- :mod:`workflows.report.page`: :func:`build_report`, the page and its section order;
- :mod:`workflows.report.sections`: tables with confidence intervals, verdicts, sample choice;
- :mod:`workflows.report.figures`: matplotlib figures (inferno colour map, colour bars, CIs);
- :mod:`workflows.report.video`: :func:`export_overlay_video`, exact frame rates;
- :mod:`workflows.report.options`: the defaults (light: the CLI imports it for ``--help``).

See docs/report.md for how to read each figure. Names are imported lazily, so ``--help`` stays fast.
"""

from __future__ import annotations

from workflows.report.options import OverlayOptions, ReportOptions

__all__ = ["OverlayOptions", "ReportOptions", "build_report", "export_overlay_video", "parse_fps"]


def __getattr__(name: str):
    if name == "build_report":
        from workflows.report.page import build_report

        return build_report
    if name in ("export_overlay_video", "parse_fps"):
        from workflows.report import video

        return getattr(video, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
