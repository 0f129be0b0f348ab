"""What the report shows: defaults shared by :func:`~workflows.report.build_report` and the CLI (light import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OverlayOptions", "ReportOptions"]


@dataclass(frozen=True)
class ReportOptions:
    """Sizes of the page's sections; ``xrcam report`` reads its defaults from here."""

    frames: int = 3  # sample frames per class (3: the best, a typical and the worst by IoU)
    videos: int = 24  # videos with their own section (timeline and overlay strip)
    gallery: int = 4  # frames in the method-disagreement gallery
    strip: int = 8  # frames in each video's overlay strip

    def __post_init__(self):
        for name in ("frames", "videos", "gallery", "strip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class OverlayOptions:
    """Defaults of the overlay video (``--overlay-video``)."""

    method: str = "xrelevancecam"
    layer_set: str = "4+3+2+1"
    fps: str = "10"  # written exactly: "7.5" is 15/2 fps, "30000/1001" NTSC
