"""Reading pCLE videos in every format an archive holds (see :mod:`xrcam.io.readers`)."""

from xrcam.io.readers import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoReader, open_video, read_image

__all__ = ["open_video", "read_image", "VideoReader", "VIDEO_SUFFIXES", "IMAGE_SUFFIXES"]
