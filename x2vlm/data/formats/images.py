"""The project's own image annotation format to shards (`x2vlm make-shards --format images`).

A JSON list, or JSONL with one object a line:
    {"image": "relative/path.jpg", "caption": "a dog on a sofa",
     "regions": [{"box": [x, y, w, h], "phrase": "the dog"}, ...]}       # regions optional; boxes in pixels
"caption" may also be "captions": [...] (the first non-empty one is used).
Entries that cannot be used are skipped, counted by reason and reported; if none is usable the converter fails.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from x2vlm.boxes import clip_xywh
from x2vlm.data.formats.common import read_annotations, report_skips
from x2vlm.data.samples import write_shards
from x2vlm.data.shards import sample_key


def _caption(entry: dict) -> str:
    caps = entry.get("captions") if "captions" in entry else [entry.get("caption")]
    for c in caps if isinstance(caps, list) else []:
        if isinstance(c, str) and c.strip():
            return c.strip()
    return ""


def convert_entry(entry, image_root: Path, skipped: Counter):
    """A sample for the shard writer, or None (with the reason counted)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        skipped["no_image_field"] += 1
        return None
    caption = _caption(entry)
    if not caption:
        skipped["empty_text"] += 1
        return None
    path = image_root / entry["image"]
    if not path.exists():
        skipped["missing_image"] += 1
        return None
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception:
        skipped["unreadable_image"] += 1
        return None
    regions = []
    for r in entry.get("regions") or []:
        box = r.get("box") if isinstance(r, dict) else None
        phrase = r.get("phrase") if isinstance(r, dict) else None
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or not isinstance(phrase, str) or not phrase.strip():
            skipped["bad_region"] += 1
            continue
        clipped = clip_xywh(box, image.width, image.height)
        if clipped is None:
            skipped["bad_box"] += 1
            continue
        regions.append({"box": clipped, "phrase": phrase.strip()})
    return {"key": sample_key(entry["image"]), "image": image, "caption": caption, "regions": regions}


def annotations_to_shards(annotations: str, image_root: str, out_dir: str, prefix: str, per_shard: int) -> list:
    skipped: Counter = Counter()
    samples = [s for s in (convert_entry(e, Path(image_root), skipped) for e in read_annotations(annotations))
               if s is not None]
    report_skips(skipped, len(samples), "entries", annotations)
    return write_shards(samples, out_dir, prefix, per_shard)
