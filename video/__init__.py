"""Video input for x2vlm, independent of the model: decoding, 1-fps timestamp sampling, video encoding and
video shard writing/reading. The image and region pipeline lives in x2vlm/data.

    from video import read_video, read_clip
    frames, times = read_video(mp4_bytes, fps=1.0, max_frames=8)    # uint8 [T, H, W, 3], seconds
    clip = read_clip(mp4_bytes, seek="keyframe")                     # approximate and faster; clip.time_error

Modules: decode (read_video, read_clip, backends choice), sampling (timestamp rules), backends (PyAV, decord,
torchcodec: exact frames or VideoDecodeError), encode (frames -> video bytes, and re-encoding with keyframes
at the sample times), indexcode (frames that carry their own index, for exactness checks), shards (WebDataset
video shards: mp4 + json, or 1-fps JPEG frames + json).
"""
from video.decode import (DEFAULT_BACKEND, SEEK_MODES, Clip, VideoDecodeError, available_backends, read_clip,
                          read_video, sample_timestamps)

__all__ = ["DEFAULT_BACKEND", "SEEK_MODES", "Clip", "VideoDecodeError", "available_backends", "read_clip",
           "read_video", "sample_timestamps"]
