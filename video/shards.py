"""WebDataset video shards: a writer for two forms and a reader that skips and counts damaged samples.

Forms of a sample (KEY has no '.' or '/'):
- "mp4": `KEY.mp4` (the video bytes as given; a path ending in .webm/.mkv/.mov/.avi keeps its extension) and
  `KEY.json` (the sample's JSON, e.g. {"caption": ..., "qa": [...]}). Decoded and sampled when read.
- "frames": the clip decoded once at write time at `fps` (every sample, no max_frames), stored as
  `KEY.000000.jpg`, `KEY.000001.jpg`, ... (JPEG quality 95) and `KEY.json`, whose reserved field "_frames"
  holds {"fps", "timestamps", "duration"}. Reading costs a few JPEG decodes instead of a video decode; the
  reader applies max_frames / min_frames to the stored frames with the same rule as for mp4
  (video.sampling.uniform_indices) and must ask for the fps the shards were written at.

Reading: `iterate_video_samples` yields {"key", "frames" uint8 [T, H, W, 3], "timestamps", "json"}. A damaged
sample is skipped and counted in `skipped` by kind (with skipped=None, a warning is issued per skip instead),
never dropped silently and never ending the iteration:
video_decode (video bytes that do not decode), bad_frames (stored JPEG frames that do not decode or disagree
with their timestamps), missing_video, bad_json, bad_shard (an unreadable or truncated tar; the rest of that
shard is lost).
"""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from video.decode import read_video_with_duration
from video.errors import VideoDecodeError
from video.sampling import uniform_indices
from x2vlm.data.shards import ShardWriter, encode_image, expand_shards, tar_samples

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
FORMS = ("mp4", "frames")


def _count(skipped: dict | None, kind: str, where: str = "") -> None:
    """Count a skipped sample; with no dict to count in, warn instead, so that nothing is dropped unseen."""
    if skipped is None:
        warnings.warn(f"skipped video sample{' ' + where if where else ''}: {kind}", stacklevel=3)
    else:
        skipped[kind] = skipped.get(kind, 0) + 1


def _video_payload(video) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's "video": bytes, or a path whose bytes are read."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        return "mp4", bytes(video)
    ext = Path(video).suffix.lower().lstrip(".")
    return (ext if ext in VIDEO_EXTS else "mp4"), Path(video).read_bytes()


def write_video_shards(samples, out_dir: str, prefix: str, per_shard: int, form: str = "mp4", fps: float = 1.0,
                       skipped: dict | None = None, quality: int = 95, backend: str = "auto") -> list:
    """Write samples {"key", "video" (bytes or path), "json" (dict)} to out_dir/prefix-000000.tar, ...; returns
    the shard paths. Each shard is written under a temporary name and renamed when complete.

    form="frames" decodes each video here: one that does not decode raises VideoDecodeError, or, when a
    `skipped` dict is given, is left out and counted there as "video_decode"."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    with ShardWriter(out_dir, prefix, per_shard) as out:
        for s in samples:
            key, meta = str(s["key"]), s.get("json") or {}
            out.check_key(key)
            if not isinstance(meta, dict) or "_frames" in meta:
                raise ValueError(f"sample {key!r}: json must be a dict without the reserved field '_frames'")
            ext, data = _video_payload(s["video"])
            record = {"__key__": key}
            if form == "mp4":
                record[ext] = data
            else:
                try:
                    frames, times, duration = read_video_with_duration(data, fps=fps, max_frames=None,
                                                                       backend=backend)
                except VideoDecodeError:
                    if skipped is None:
                        raise
                    _count(skipped, "video_decode")
                    continue
                meta = {**meta, "_frames": {"fps": fps, "timestamps": times, "duration": duration}}
                for i, frame in enumerate(frames):
                    record[f"{i:06d}.jpg"] = encode_image(frame, "jpg", quality)
            record["json"] = json.dumps(meta).encode("utf-8")
            out.write(record)
    return out.paths


def _frames_sample(key: str, files: dict, meta: dict, fps: float, max_frames, min_frames, train, rng):
    info = meta.pop("_frames")
    names = sorted(name for name in files if name.endswith(".jpg") and name[:-4].isdigit())
    times = info.get("timestamps") if isinstance(info, dict) else None
    if not isinstance(times, list) or not names or len(names) != len(times):
        return None, "bad_frames"
    if abs(float(info.get("fps", 0)) - fps) > 1e-9:
        raise ValueError(f"sample {key!r} was written at {info.get('fps')} fps; read these shards with that fps")
    keep = uniform_indices(len(names), max_frames, min_frames, train, rng)
    decoded = {}
    try:
        for i in sorted(set(keep)):
            with Image.open(io.BytesIO(files[names[i]])) as im:
                decoded[i] = np.asarray(im.convert("RGB"))
    except Exception:
        return None, "bad_frames"
    if len({a.shape for a in decoded.values()}) != 1:
        return None, "bad_frames"
    frames = np.stack([decoded[i] for i in keep])
    return {"key": key, "frames": frames, "timestamps": [float(times[i]) for i in keep], "json": meta}, None


def decode_video_sample(key: str, files: dict, fps: float = 1.0, max_frames: int | None = 8, min_frames: int = 1,
                        train: bool = False, rng=None, backend: str = "auto"):
    """(sample, None) or (None, kind of damage) for one shard sample's files {extension: bytes}."""
    if "json" not in files:
        return None, "bad_json"
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except ValueError:  # covers UnicodeDecodeError and JSONDecodeError
        return None, "bad_json"
    if not isinstance(meta, dict):
        return None, "bad_json"
    if "_frames" in meta:
        return _frames_sample(key, files, meta, fps, max_frames, min_frames, train, rng)
    ext = next((e for e in VIDEO_EXTS if e in files), None)
    if ext is None:
        return None, "missing_video"
    try:
        frames, times = read_video_with_duration(files[ext], fps, max_frames, min_frames, train, rng, backend)[:2]
    except VideoDecodeError:
        return None, "video_decode"
    return {"key": key, "frames": frames, "timestamps": times, "json": meta}, None


def iterate_video_samples(shards, fps: float = 1.0, max_frames: int | None = 8, min_frames: int = 1,
                          train: bool = False, rng=None, skipped: dict | None = None, backend: str = "auto"):
    """Samples {"key", "frames", "timestamps", "json"} of the shards (paths, globs, brace patterns or folders,
    read in sorted order); damaged samples are counted in `skipped` (see the module docstring)."""
    for path in expand_shards(shards):
        try:
            for key, files in tar_samples(path):
                sample, kind = decode_video_sample(key, files, fps, max_frames, min_frames, train, rng, backend)
                if sample is None:
                    _count(skipped, kind, f"{key!r} of {path}")
                    continue
                yield sample
        except (OSError, EOFError, tarfile.TarError):
            _count(skipped, "bad_shard", path)
