"""Visual Genome region descriptions to region shards (`x2vlm make-shards --format vg`).

`region_descriptions.json`: a list of {"id" (the image id), "regions": [{"region_id", "image_id", "x", "y", "width",
"height", "phrase"}]}. With `image_data.json` (a list of {"image_id" or "id", "url", "width", "height"}) an image's
file is found by its URL's last two parts (VG_100K/1.jpg) under the image root, and boxes are scaled from the
size given there to the file's size (some files differ from it); without it, IMAGE_ROOT/VG_100K/<id>.jpg,
VG_100K_2/<id>.jpg or <id>.jpg. A Visual Genome image has no whole-image caption: its samples have regions only
(a region source; their texts are region phrases with their boxes). Each sample's json: {"regions", "image_id"}.

Skipped and counted: entries that are not objects or have no image id ("bad_entry"), regions without a usable box
("bad_box") or phrase ("empty_text"), images left without regions ("no_text"), missing or unreadable files.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from x2vlm.data.formats.common import read_json, region, texts, write_images

FOLDERS = ("VG_100K", "VG_100K_2", "")


def _image_files(image_data, root: Path, skipped: Counter) -> dict:
    """{image id: (path, (width, height) or None)} from image_data.json."""
    out = {}
    for im in image_data if isinstance(image_data, list) else []:
        image_id = im.get("image_id", im.get("id")) if isinstance(im, dict) else None
        if image_id is None:
            skipped["bad_image_data"] += 1
            continue
        url = im.get("url") if isinstance(im.get("url"), str) else ""
        rel = "/".join(url.rstrip("/").split("/")[-2:]) if url else f"{image_id}.jpg"
        size = (im.get("width"), im.get("height"))
        ok = all(isinstance(v, (int, float)) and v > 0 for v in size)
        out[image_id] = (str(root / rel), size if ok else None)
    return out


def _guess(root: Path, image_id) -> str:
    for folder in FOLDERS:
        path = root / folder / f"{image_id}.jpg"
        if path.exists():
            return str(path)
    return str(root / FOLDERS[0] / f"{image_id}.jpg")


def vg_tasks(descriptions: list, files: dict | None, root: Path, skipped: Counter):
    for entry in descriptions:
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if image_id is None or not isinstance(entry.get("regions"), list):
            skipped["bad_entry"] += 1
            continue
        regions = []
        for r in entry["regions"]:
            if not isinstance(r, dict):
                skipped["bad_box"] += 1
                continue
            out, why = region([r.get("x"), r.get("y"), r.get("width"), r.get("height")], texts(r.get("phrase")))
            if out is None:
                skipped[why] += 1
            else:
                regions.append(out)
        if not regions:
            skipped["no_text"] += 1
            continue
        path, size = files.get(image_id, (None, None)) if files is not None else (None, None)
        yield {"key": f"vg_{image_id}", "image": path or _guess(root, image_id), "size": size, "captions": [],
               "regions": regions, "fields": {"image_id": image_id}}


def vg_to_shards(annotations: str, image_root: str, out_dir: str, prefix: str = "data", per_shard: int = 1000,
                 processes: int = 1, image_data: str | None = None) -> list:
    """region_descriptions.json (+ image_data.json) -> region shards."""
    descriptions = read_json(annotations)
    if not isinstance(descriptions, list):
        raise ValueError(f"{annotations}: expected a list of {{id, regions}} (Visual Genome region_descriptions)")
    root, skipped = Path(image_root), Counter()
    files = _image_files(read_json(image_data), root, skipped) if image_data else None
    return write_images(vg_tasks(descriptions, files, root, skipped), out_dir, prefix, per_shard, processes,
                        "images with regions", annotations, skipped)
