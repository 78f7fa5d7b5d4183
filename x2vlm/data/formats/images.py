"""The project's own image annotation format to shards (`x2vlm make-shards --format images`).

A JSON list, or JSONL with one object a line:
    {"image": "relative/path.jpg", "caption": "a dog on a sofa",
     "regions": [{"box": [x, y, w, h], "phrase": "the dog"}, ...]}       # regions optional; boxes in pixels
"caption" may be a string or a list of strings, or "captions": [...]. Entries that name the same image are one
sample with all their captions and regions (in file order); so ALBEF / X-VLM style files with one caption per
entry read as they are. Entries that cannot be used are skipped, counted by reason and reported; if none is
usable the converter fails.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from x2vlm.data.formats.common import read_annotations, region, texts, write_images
from x2vlm.data.shards import sample_key


def image_tasks(entries: list, image_root: Path, skipped: Counter):
    by_image: dict = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
            skipped["no_image_field"] += 1
            continue
        captions = texts(entry["captions"] if "captions" in entry else entry.get("caption"))
        if not captions:
            skipped["empty_text"] += 1
            continue
        regions = []
        for r in entry.get("regions") or []:
            out, _ = region(r.get("box"), texts(r.get("phrase"))) if isinstance(r, dict) else (None, None)
            if out is None:
                skipped["bad_region"] += 1
            else:
                regions.append(out)
        task = by_image.setdefault(entry["image"], {"key": sample_key(entry["image"]),
                                                    "image": str(image_root / entry["image"]),
                                                    "captions": [], "regions": []})
        task["captions"] += [c for c in captions if c not in task["captions"]]
        task["regions"] += regions
    yield from by_image.values()


def annotations_to_shards(annotations: str, image_root: str, out_dir: str, prefix: str, per_shard: int,
                          processes: int = 1) -> list:
    skipped: Counter = Counter()
    tasks = image_tasks(read_annotations(annotations), Path(image_root), skipped)
    return write_images(tasks, out_dir, prefix, per_shard, processes, "images", annotations, skipped)
