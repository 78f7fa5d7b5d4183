"""Video input for x2vlm, independent of the model: decoding, 1-fps timestamp sampling, video encoding and
video shard writing/reading. The image and region pipeline lives in x2vlm/data.

    from video import read_video
    frames, times = read_video(mp4_bytes, fps=1.0, max_frames=8)    # uint8 [T, H, W, 3], seconds

Modules: decode (read_video, backends choice), sampling (timestamp rules), backends (PyAV, decord,
torchcodec), encode (frames -> mp4 bytes with PyAV), indexcode (frames that carry their own index, for
exactness checks), shards (WebDataset video shards: mp4 + json, or 1-fps JPEG frames + json).
"""
from video.decode import DEFAULT_BACKEND, VideoDecodeError, available_backends, read_video, sample_timestamps

__all__ = ["DEFAULT_BACKEND", "VideoDecodeError", "available_backends", "read_video", "sample_timestamps"]
