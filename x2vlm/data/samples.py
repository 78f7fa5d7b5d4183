"""What a sample is in a shard, both ways: records to write, and decoders that turn a shard's files back into
samples. One convention for damage everywhere: a decoder returns (sample or None, {kind: count}).

Image samples: `KEY.jpg` (or png, webp) + `KEY.json` {"caption": str, "regions": [{"box": [x, y, w, h],
"phrase": str}, ...], any further fields}; boxes in pixels, an image-text sample has no (or empty) regions.

Video samples, two forms:
- "mp4": `KEY.mp4` (the bytes as given; webm, mkv, mov and avi keep their extension) + `KEY.json`. Decoded and
  sampled at `fps` when read.
- "frames": the clip decoded once at write time at `fps` (every sample time, no frame budget), stored as
  `KEY.000000.jpg`, `KEY.000001.jpg`, ... + `KEY.json`, whose reserved field "_frames" holds {"fps",
  "timestamps", "duration"}. Reading costs a few JPEG decodes; the frame budget is applied with the same rule as
  for mp4 (video.sampling.uniform_indices), and the reader must ask for the fps the shards were written at.

Kinds of damage (SKIP_KINDS): bad_image, bad_json, bad_utf8, missing_caption, empty_text, bad_box (a region
whose box has no area inside the image: the region is dropped, the sample kept), bad_shard (counted by the shard
reader), video_decode, missing_video, bad_frames, bad_qa.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from video.decode import read_video_with_duration
from video.encode import reencode
from video.errors import VideoDecodeError
from video.sampling import uniform_indices
from x2vlm.boxes import box_ok, clip_xywh
from x2vlm.data.shards import ShardWriter

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
VIDEO_FORMS = ("mp4", "frames")
SKIP_KINDS = ("bad_image", "bad_json", "bad_utf8", "missing_caption", "empty_text", "bad_box", "bad_shard",
              "video_decode", "missing_video", "bad_frames", "bad_qa")


def add_counts(total: dict, counts) -> dict:
    """Add {kind: count} into `total` (in place); returns it."""
    for kind, n in (counts or {}).items():
        total[kind] = total.get(kind, 0) + int(n)
    return total


def encode_image(image, image_format: str = "jpg", quality: int = 95) -> bytes:
    """PIL image or uint8 HxWx3 array -> JPEG or PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    if image_format == "png":
        image.convert("RGB").save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta).encode("utf-8")


def _read_json(files: dict):
    """(dict, None) or (None, {kind: 1}) from a sample's "json" member."""
    if "json" not in files:
        return None, {"bad_json": 1}
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except UnicodeDecodeError:
        return None, {"bad_utf8": 1}
    except ValueError:
        return None, {"bad_json": 1}
    return (meta, None) if isinstance(meta, dict) else (None, {"bad_json": 1})


# --- image samples ---------------------------------------------------------------------------------------------

def clean_regions(regions, width: int, height: int):
    """Regions clipped to the image; (kept, number dropped for a box without area inside the image)."""
    kept = []
    for r in regions:
        box = clip_xywh(r["box"], width, height)
        if box is not None:
            kept.append({**r, "box": box})
    return kept, len(regions) - len(kept)


def decode_image(key: str, files: dict, rng=None):
    """(sample {"key", "image": PIL RGB, "json": dict}, {kind: count}); the sample is None when unusable. `rng`
    is not needed (the signature of every decoder)."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, {"bad_image": 1}
    meta, bad = _read_json(files)
    if meta is None:
        return None, bad
    if "caption" not in meta:
        return None, {"missing_caption": 1}
    caption, regions = meta["caption"], meta.get("regions") or []
    if not isinstance(caption, str) or not isinstance(regions, list):
        return None, {"bad_json": 1}
    if not caption.strip():
        return None, {"empty_text": 1}
    for r in regions:
        if not isinstance(r, dict) or not box_ok(r.get("box")) or not isinstance(r.get("phrase"), str):
            return None, {"bad_json": 1}
        if not r["phrase"].strip():
            return None, {"empty_text": 1}
    try:
        with Image.open(io.BytesIO(files[ext])) as im:
            image = im.convert("RGB")
    except Exception:
        return None, {"bad_image": 1}
    regions, dropped = clean_regions(regions, *image.size)
    meta = {**meta, "caption": caption.strip(), "regions": [{**r, "phrase": r["phrase"].strip()} for r in regions]}
    return {"key": key, "image": image, "json": meta}, ({"bad_box": dropped} if dropped else {})


def write_shards(samples, out_dir: str, prefix: str, samples_per_shard: int, image_format: str = "jpg",
                 quality: int = 95) -> list:
    """Write image samples {"key", "image" (PIL or uint8 array), "caption", "regions", other JSON-able fields} to
    out_dir/prefix-000000.tar, ... (see ShardWriter); returns the shard paths."""
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format: expected 'jpg' or 'png', got {image_format!r}")
    with ShardWriter(out_dir, prefix, samples_per_shard) as out:
        for s in samples:
            meta = {k: v for k, v in s.items() if k not in ("key", "image")}
            out.write({"__key__": str(s["key"]), image_format: encode_image(s["image"], image_format, quality),
                       "json": _json_bytes(meta)})
    return out.paths


# --- video samples ---------------------------------------------------------------------------------------------

def _video_payload(video) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's "video": bytes, or a path whose bytes are read."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        return "mp4", bytes(video)
    ext = Path(video).suffix.lower().lstrip(".")
    return (ext if ext in VIDEO_EXTS else "mp4"), Path(video).read_bytes()


def write_video_shards(samples, out_dir: str, prefix: str, per_shard: int, form: str = "mp4", fps: float = 1.0,
                       skipped: dict | None = None, quality: int = 95, backend: str = "auto",
                       reencode_gop: float | None = None) -> list:
    """Write video samples {"key", "video" (bytes or path), "json" (dict)} to out_dir/prefix-000000.tar, ...;
    returns the shard paths.

    reencode_gop=S (mp4 form) re-encodes each video (video stream only, H.264 mp4) with a keyframe at the frame on
    screen at every (k + 0.5) * S seconds, so that sparse reading decodes little (video.encode.reencode).
    form="frames" decodes each video here. A video that does not decode raises VideoDecodeError, or, when a
    `skipped` dict is given, is left out and counted there as "video_decode"."""
    if form not in VIDEO_FORMS:
        raise ValueError(f"form: expected one of {', '.join(VIDEO_FORMS)}, got {form!r}")
    with ShardWriter(out_dir, prefix, per_shard) as out:
        for s in samples:
            key, meta = str(s["key"]), s.get("json") or {}
            out.check_key(key)
            if not isinstance(meta, dict) or "_frames" in meta:
                raise ValueError(f"sample {key!r}: json must be a dict without the reserved field '_frames'")
            ext, data = _video_payload(s["video"])
            record = {"__key__": key}
            try:
                if form == "mp4" and reencode_gop:
                    record["mp4"] = reencode(data, gop_seconds=reencode_gop)
                elif form == "mp4":
                    record[ext] = data
                else:
                    frames, times, duration = read_video_with_duration(data, fps=fps, max_frames=None,
                                                                       backend=backend)
                    meta = {**meta, "_frames": {"fps": fps, "timestamps": times, "duration": duration}}
                    for i, frame in enumerate(frames):
                        record[f"{i:06d}.jpg"] = encode_image(frame, "jpg", quality)
            except VideoDecodeError:
                if skipped is None:
                    raise
                add_counts(skipped, {"video_decode": 1})
                continue
            record["json"] = _json_bytes(meta)
            out.write(record)
    return out.paths


def _frames_sample(key: str, files: dict, meta: dict, fps: float, max_frames, min_frames, train, rng):
    info = meta.pop("_frames")
    names = sorted(name for name in files if name.endswith(".jpg") and name[:-4].isdigit())
    times = info.get("timestamps") if isinstance(info, dict) else None
    if not isinstance(times, list) or not names or len(names) != len(times):
        return None, {"bad_frames": 1}
    if abs(float(info.get("fps", 0)) - fps) > 1e-9:
        raise ValueError(f"sample {key!r} was written at {info.get('fps')} fps; read these shards with that fps")
    keep = uniform_indices(len(names), max_frames, min_frames, train, rng)
    decoded = {}
    try:
        for i in sorted(set(keep)):
            with Image.open(io.BytesIO(files[names[i]])) as im:
                decoded[i] = np.asarray(im.convert("RGB"))
    except Exception:
        return None, {"bad_frames": 1}
    if len({a.shape for a in decoded.values()}) != 1:
        return None, {"bad_frames": 1}
    frames = np.stack([decoded[i] for i in keep])  # [T, H, W, 3]
    return {"key": key, "frames": frames, "timestamps": [float(times[i]) for i in keep], "json": meta}, {}


def decode_clip(key: str, files: dict, fps: float = 1.0, max_frames: int | None = 8, min_frames: int = 1,
                train: bool = False, rng=None, backend: str = "auto", **seek):
    """(sample {"key", "frames" uint8 [T, H, W, 3], "timestamps", "json"}, {kind: count}) of one video sample's
    files, in either form; the sample is None when unusable. `seek`: video.read_clip's seek and
    keyframe_tolerance (mp4 form)."""
    meta, bad = _read_json(files)
    if meta is None:
        return None, bad
    if "_frames" in meta:
        return _frames_sample(key, files, meta, fps, max_frames, min_frames, train, rng)
    ext = next((e for e in VIDEO_EXTS if e in files), None)
    if ext is None:
        return None, {"missing_video": 1}
    try:
        frames, times = read_video_with_duration(files[ext], fps, max_frames, min_frames, train, rng, backend,
                                                 **seek)[:2]
    except VideoDecodeError:
        return None, {"video_decode": 1}
    return {"key": key, "frames": frames, "timestamps": times, "json": meta}, {}


class ClipDecoder:
    """Decoder of video samples: frames sampled at `fps` (random offsets when training; exact frames, or with
    seek="keyframe" the nearest keyframe within keyframe_tolerance seconds), and what the source kind needs of the
    JSON: "caption" (a caption, or "captions" of which training draws one), "qa" ("qa":
    [{"question", "label", ...}]), or nothing (None)."""

    def __init__(self, fps: float = 1.0, max_frames: int | None = 8, min_frames: int = 1, train: bool = False,
                 needs: str | None = None, backend: str = "auto", seek: str = "exact",
                 keyframe_tolerance: float = 0.5):
        if needs not in (None, "caption", "qa"):
            raise ValueError(f"needs: expected None, 'caption' or 'qa', got {needs!r}")
        self.fps, self.max_frames, self.min_frames, self.train = fps, max_frames, min_frames, train
        self.needs, self.backend = needs, backend
        self.seek = {"seek": seek, "keyframe_tolerance": keyframe_tolerance}

    def __call__(self, key: str, files: dict, rng=None):
        sample, bad = decode_clip(key, files, self.fps, self.max_frames, self.min_frames, self.train, rng,
                                  self.backend, **self.seek)
        if sample is None or self.needs is None:
            return sample, bad
        meta = sample["json"]
        if self.needs == "qa":
            qa = meta.get("qa")
            ok = isinstance(qa, list) and qa and all(isinstance(q, dict) and isinstance(q.get("question"), str)
                                                      and isinstance(q.get("label"), int) for q in qa)
            return (sample, {}) if ok else (None, {"bad_qa": 1})
        captions = meta.get("captions") if isinstance(meta.get("captions"), list) else [meta.get("caption")]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            return None, {"empty_text": 1}
        if self.train and len(captions) > 1:  # (no draw for a single caption: the sampling stream stays as is)
            meta["caption"] = captions[int(rng.integers(len(captions)))]
        else:
            meta["caption"] = captions[0]
        return sample, {}
