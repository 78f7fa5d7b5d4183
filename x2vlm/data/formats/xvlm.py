"""X-VLM / X2-VLM pre-training JSON lines to shards (`x2vlm make-shards --format xvlm` and `--format xvlm-video`).

Image-text lines: the image as base64 under "binary", or as a path under "image_rpath", "image", "img_path" or
"image_path" (relative to the image root; `image_key` picks another key); the caption under "caption" or "desc"
(`caption_key` picks another): a string, a list of strings (all kept, training draws one), or a {language: string}
dict (all its languages, or only `lang`).
Region lines: the image as above, "elems": [{"caption": str or [str], "bb": [x, y, w, h] in pixels, "attributes":
str or [str] (optional, put before the caption)}], and an optional whole-image caption. Each element becomes a
region (its phrases: every "attribute caption" combination); an image known by its regions only has no caption
(train it in a region source). Lines that name the same image file make one sample (captions and regions
merged in file order); a base64 image is one sample per line, keyed FILE_LINE.

Video-text lines (`xvlm-video`): "video_frames": a list of base64 frames, or a list of clips (each a list of
frames) with "is_continuous"; "text": a string or a list with one caption per clip. X-VLM's files do not say at
what rate the frames were taken: they are stored as they are (the "frames" form of video shards) at the rate
given as `frame_fps` (default 1 frame per second; read such shards with a source `fps` equal to it). A list of
frames is one sample with its text(s) as captions; continuous clips are one sample, their frames in order, the
caption their texts joined ("[Music]" dropped); separate clips are one sample each with their own text.

Skipped and counted: lines without an image ("no_image"), without any text ("empty_text"), bad base64
("bad_base64"), missing or unreadable images ("missing_image", "unreadable_image"), frames that do not decode
or differ in size ("bad_frames"), elements without a usable box or caption ("bad_box", "empty_text").
"""
from __future__ import annotations

import base64
import binascii
import io
from collections import Counter
from pathlib import Path

from PIL import Image

from x2vlm.data.formats.common import (Counted, annotation_files, convert, json_lines, region, report_skips, texts,
                                       write_images)
from x2vlm.data.shards import sample_key

PATH_KEYS = ("image_rpath", "image", "img_path", "image_path")
CAPTION_KEYS = ("caption", "desc")


def _file_stems(files: list) -> list:
    """A key prefix per annotation file: its name, with its position in front where names repeat."""
    names = [sample_key(Path(f).name) for f in files]
    return [f"{i:03d}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _image_of(entry: dict, image_key: str | None):
    """("binary", base64 text) or ("path", relative path) of a line's image, or (None, None)."""
    keys = [image_key] if image_key else ["binary", *PATH_KEYS]
    for k in keys:
        v = entry.get(k)
        if isinstance(v, str) and v.strip():
            return ("binary" if k == "binary" else "path"), v
    return None, None


def _regions(elems, skipped: Counter) -> list:
    out = []
    for e in elems if isinstance(elems, list) else []:
        if not isinstance(e, dict):
            skipped["bad_region"] += 1
            continue
        caps, attrs = texts(e.get("caption")), texts(e.get("attributes"))
        phrases = [f"{a} {c}" for c in caps for a in attrs] or caps
        r, why = region(e.get("bb"), phrases)
        if r is None:
            skipped[why] += 1
        else:
            out.append(r)
    return out


def image_tasks(files: list, image_root: str, skipped: Counter, image_key=None, caption_key=None, lang=None):
    """Tasks for common.image_sample: base64 lines as they come, then the images named by path (merged)."""
    by_path: dict = {}
    for path, stem in zip(files, _file_stems(files)):
        for n, entry in json_lines(path):
            if not isinstance(entry, dict):
                skipped["bad_entry"] += 1
                continue
            kind, image = _image_of(entry, image_key)
            if kind is None:
                skipped["no_image"] += 1
                continue
            keys = [caption_key] if caption_key else CAPTION_KEYS
            captions = next((texts(entry[k], lang) for k in keys if k in entry), [])
            regions = _regions(entry["elems"], skipped) if "elems" in entry else []
            if not captions and not regions:
                skipped["empty_text"] += 1
                continue
            if kind == "binary":
                yield {"key": f"{stem}_{n:09d}", "image": image, "base64": True, "captions": captions,
                       "regions": regions}
                continue
            task = by_path.setdefault(image, {"key": sample_key(image), "image": str(Path(image_root) / image),
                                              "captions": [], "regions": []})
            task["captions"] += [c for c in captions if c not in task["captions"]]
            task["regions"] += regions
    yield from by_path.values()


def images_to_shards(annotations, image_root: str, out_dir: str, prefix: str = "data", per_shard: int = 1000,
                     processes: int = 1, image_key: str | None = None, caption_key: str | None = None,
                     lang: str | None = None) -> list:
    """X-VLM image-text and region JSON lines (files or folders of them) -> image shards."""
    files = annotation_files(annotations)
    skipped: Counter = Counter()
    tasks = image_tasks(files, image_root, skipped, image_key, caption_key, lang)
    return write_images(tasks, out_dir, prefix, per_shard, processes, "images", ", ".join(files), skipped)


# --- video-text ------------------------------------------------------------------------------------------------

def clip_sample(task: dict):
    """(video sample {"key", "frames": [JPEG bytes], "json"} or None, {reason: count}) of base64 frames."""
    frames, size = [], None
    for b64 in task["frames"]:
        try:
            data = base64.b64decode("".join(b64.split()), validate=True)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.format != "JPEG":
                    buf = io.BytesIO()
                    im.convert("RGB").save(buf, format="JPEG", quality=95)
                    data = buf.getvalue()
                if size not in (None, im.size):
                    return None, {"bad_frames": 1}
                size = im.size
        except (binascii.Error, ValueError, TypeError, OSError, Image.DecompressionBombError):
            return None, {"bad_frames": 1}
        frames.append(data)
    return {"key": task["key"], "frames": frames, "json": {"caption": task["captions"][0],
                                                           "captions": task["captions"]}}, {}


def _clip_text(text: str) -> bool:
    return text != "[Music]"


def video_tasks(files: list, skipped: Counter, frames_key: str = "video_frames", caption_key: str = "text"):
    for path, stem in zip(files, _file_stems(files)):
        for n, entry in json_lines(path):
            frames = entry.get(frames_key) if isinstance(entry, dict) else None
            if not isinstance(frames, list) or not frames:
                skipped["bad_entry" if not isinstance(entry, dict) else "no_frames"] += 1
                continue
            raw = entry.get(caption_key)
            key = f"{stem}_{n:09d}"
            if all(isinstance(f, str) for f in frames):  # one list of frames
                captions = [t for t in texts(raw) if _clip_text(t)]
                if not captions:
                    skipped["empty_text"] += 1
                    continue
                yield {"key": key, "frames": frames, "captions": captions}
                continue
            if not all(isinstance(c, list) and c and all(isinstance(f, str) for f in c) for c in frames):
                skipped["bad_frames"] += 1
                continue
            per_clip = raw if isinstance(raw, list) and len(raw) == len(frames) else [raw] * len(frames)
            if entry.get("is_continuous"):
                joined = " ".join(t for value in per_clip for t in texts(value) if _clip_text(t))
                if not joined:
                    skipped["empty_text"] += 1
                    continue
                yield {"key": key, "frames": [f for clip in frames for f in clip], "captions": [joined]}
                continue
            for i, (clip, value) in enumerate(zip(frames, per_clip)):
                captions = [t for t in texts(value) if _clip_text(t)]
                if not captions:
                    skipped["empty_text"] += 1
                    continue
                yield {"key": f"{key}_{i}", "frames": clip, "captions": captions}


def videos_to_shards(annotations, out_dir: str, prefix: str = "data", per_shard: int = 500, processes: int = 1,
                     frame_fps: float = 1.0, frames_key: str = "video_frames", caption_key: str = "text") -> list:
    """X-VLM video-text JSON lines (files or folders of them) -> video shards in the "frames" form."""
    from x2vlm.data.samples import write_video_shards

    if not frame_fps > 0:
        raise ValueError(f"frame_fps: expected a positive number, got {frame_fps}")
    files = annotation_files(annotations)
    skipped: Counter = Counter()
    samples = Counted(convert(video_tasks(files, skipped, frames_key, caption_key), clip_sample, processes,
                              desc="video-text", skipped=skipped))
    paths = write_video_shards(samples, out_dir, prefix, per_shard, form="frames", fps=frame_fps)
    report_skips(skipped, samples.n, f"clips (frames at {frame_fps:g} per second)", ", ".join(files))
    return paths
