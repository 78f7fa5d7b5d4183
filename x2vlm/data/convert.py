"""Converters from annotation files (and the synthetic world) to WebDataset shards, for `x2vlm make-shards`.

Annotation format: a JSON list, or JSONL with one object a line:
    {"image": "relative/path.jpg", "caption": "a dog on a sofa",
     "regions": [{"box": [x, y, w, h], "phrase": "the dog"}, ...]}       # regions optional; boxes in pixels
"caption" may also be "captions": [...] (the first non-empty one is used).
Entries that cannot be used are skipped, counted by reason and reported; if none is usable the converter fails.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image

from x2vlm.data.shards import write_shards


def parse_json(text: str, where: str):
    """json.loads, with a ValueError that names the file (and line) when the text is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def read_annotations(path: str) -> list:
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        entries = parse_json(text, path)
    else:
        entries = [parse_json(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list or JSON lines")
    return entries


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
        x, y, w, h = map(float, box)
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(image.width), x + w), min(float(image.height), y + h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            skipped["bad_box"] += 1
            continue
        regions.append({"box": [x0, y0, x1 - x0, y1 - y0], "phrase": phrase.strip()})
    return {"key": Path(entry["image"]).with_suffix("").as_posix().replace("/", "_").replace(".", "_"),
            "image": image, "caption": caption, "regions": regions}


def annotations_to_shards(annotations: str, image_root: str, out_dir: str, prefix: str, per_shard: int) -> list:
    skipped: Counter = Counter()
    samples = [s for s in (convert_entry(e, Path(image_root), skipped) for e in read_annotations(annotations))
               if s is not None]
    for reason, n in sorted(skipped.items()):
        print(f"skipped {n} entr{'y' if n == 1 else 'ies'}: {reason}")
    if not samples:
        raise ValueError(f"{annotations}: no usable entry ({sum(skipped.values())} skipped)")
    print(f"{len(samples)} usable entries")
    return write_shards(samples, out_dir, prefix, per_shard)


def synthetic_to_shards(out_dir: str, split: str, n: int, seed: int, image_size: int, per_shard: int) -> list:
    from x2vlm.data.shapesworld import generate

    return write_shards(generate(split, n, seed=seed, image_size=image_size), out_dir, split, per_shard)
