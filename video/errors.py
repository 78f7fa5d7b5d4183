"""The one error that video decoding raises for input it cannot use."""


class VideoDecodeError(Exception):
    """Corrupt, truncated, zero-length, audio-only or otherwise undecodable video input.

    Every backend turns its own failures (FFmpeg errors, decord errors, missing frames) into this one type, so
    that data pipelines can skip and count a damaged sample with a single `except`."""
