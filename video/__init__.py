"""Video input, independent of the model (nothing here imports x2vlm): decoding, 1-fps timestamp sampling and
video encoding. Video shards are written and read by x2vlm/data.

    from video import read_video, read_clip
    frames, times = read_video(mp4_bytes, fps=1.0, max_frames=8)    # uint8 [T, H, W, 3], seconds
    clip = read_clip(mp4_bytes, seek="keyframe")                     # approximate and faster; clip.time_error

Modules: decode (read_video, read_clip, backends choice), sampling (timestamp rules), backends (PyAV, decord,
torchcodec: exact frames or VideoDecodeError), encode (frames -> video bytes, and re-encoding with keyframes
at the sample times), indexcode (frames that carry their own index, for exactness checks).
"""
from video.decode import (DEFAULT_BACKEND, SEEK_MODES, Clip, VideoDecodeError, available_backends, read_clip,
                          read_video, sample_timestamps)

__all__ = ["DEFAULT_BACKEND", "SEEK_MODES", "Clip", "VideoDecodeError", "available_backends", "read_clip",
           "read_video", "sample_timestamps"]
