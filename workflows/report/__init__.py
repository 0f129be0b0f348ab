"""``xrcam report``: a self-contained HTML report of a reduced results folder, and overlay videos.

- :mod:`workflows.report.page`: :func:`build_report`, the page and its section order;
- :mod:`workflows.report.sections`: tables with confidence intervals, verdicts, sample choice;
- :mod:`workflows.report.figures`: matplotlib figures (inferno colour map, colour bars, CIs);
- :mod:`workflows.report.video`: :func:`export_overlay_video`, exact frame rates.

See docs/report.md for how to read each figure.
"""

from workflows.report.page import ReportOptions, build_report
from workflows.report.video import export_overlay_video, parse_fps

__all__ = ["ReportOptions", "build_report", "export_overlay_video", "parse_fps"]
