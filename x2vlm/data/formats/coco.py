"""COCO captions to image shards (`x2vlm make-shards --format coco`), one sample per image with all its captions.

Three published forms, told apart by their content:
- the official `captions_train2014.json` / `captions_val2014.json` (also 2017): {"images": [{"id", "file_name",
  ...}], "annotations": [{"image_id", "caption", ...}]}; images are looked for as IMAGE_ROOT/file_name, then
  IMAGE_ROOT/<split folder named in the file name>/file_name (COCO_val2014_... -> val2014/);
- Karpathy's `dataset_coco.json`: {"images": [{"filepath", "filename", "cocoid", "split", "sentences": [{"raw"}]}]},
  filtered by `split` (e.g. "test", or "train,restval" for the usual training set);
- the Karpathy-split files of ALBEF / X-VLM: `coco_karpathy_train.json`, a list of {"image", "caption",
  "image_id"} with one caption per entry (entries of one image are merged), and `coco_karpathy_val.json` /
  `coco_karpathy_test.json` with "caption" lists.
Each sample's json: {"caption" (the first), "captions" (all, in file order), "image_id"}. Training draws one caption
per image and epoch; retrieval evaluation ranks every caption against every image, an image's captions all
counting as its own (instances by "image_id").

Skipped and counted: entries that are not objects or name no image ("bad_entry"), captions that are empty
("empty_text"), annotations of images the file does not list ("unknown_image"), images with no caption
("no_caption"), missing or unreadable image files.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from x2vlm.data.formats.common import read_json, texts, write_images
from x2vlm.data.shards import sample_key

SPLIT_FOLDER = re.compile(r"(train|val|test)(20\d\d)")


def _find(root: Path, name: str) -> str:
    """IMAGE_ROOT/name, or the file in the split folder that a COCO file name names, where that exists."""
    path = root / name
    m = SPLIT_FOLDER.search(Path(name).name)
    if not path.exists() and m and (root / m.group(0) / Path(name).name).exists():
        return str(root / m.group(0) / Path(name).name)
    return str(path)


def _image_id(value, name: str):
    if isinstance(value, (int, str)) and str(value).strip():
        return value
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else name


def official_tasks(data: dict, root: Path, skipped: Counter):
    images = {}
    for im in data.get("images") or []:
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and "id" in im:
            images[im["id"]] = im
        else:
            skipped["bad_entry"] += 1
    captions: dict = {i: [] for i in images}
    for a in data.get("annotations") or []:
        if not isinstance(a, dict):
            skipped["bad_entry"] += 1
        elif a.get("image_id") not in images:
            skipped["unknown_image"] += 1
        elif not texts(a.get("caption")):
            skipped["empty_text"] += 1
        else:
            captions[a["image_id"]] += texts(a["caption"])
    for image_id, im in images.items():
        if not captions[image_id]:
            skipped["no_caption"] += 1
            continue
        yield {"key": sample_key(im["file_name"]), "image": _find(root, im["file_name"]),
               "captions": captions[image_id], "fields": {"image_id": image_id}}


def karpathy_tasks(data: dict, root: Path, splits, skipped: Counter):
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            skipped["bad_entry"] += 1
            continue
        if splits and im.get("split") not in splits:
            continue
        caps = [c for s in im.get("sentences") or [] if isinstance(s, dict) for c in texts(s.get("raw"))]
        if not caps:
            skipped["no_caption"] += 1
            continue
        name = str(Path(im.get("filepath") or "") / im["filename"])
        yield {"key": sample_key(name), "image": _find(root, name), "captions": caps,
               "fields": {"image_id": _image_id(im.get("cocoid", im.get("imgid")), name)}}


def list_tasks(entries: list, root: Path, skipped: Counter):
    by_image: dict = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not e["image"].strip():
            skipped["bad_entry"] += 1
            continue
        caps = texts(e.get("caption", e.get("captions")))
        if not caps:
            skipped["empty_text"] += 1
            continue
        task = by_image.setdefault(e["image"], {"key": sample_key(e["image"]), "image": _find(root, e["image"]),
                                                "captions": [],
                                                "fields": {"image_id": _image_id(e.get("image_id"), e["image"])}})
        task["captions"] += caps
    yield from by_image.values()


def coco_to_shards(annotations: str, image_root: str, out_dir: str, prefix: str = "data", per_shard: int = 1000,
                   processes: int = 1, split: str | None = None) -> list:
    """A COCO captions file in any of the three forms -> image shards."""
    data = read_json(annotations)
    root, skipped = Path(image_root), Counter()
    splits = {s.strip() for s in split.split(",")} if split else None
    if isinstance(data, dict) and "annotations" in data:
        tasks = official_tasks(data, root, skipped)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        tasks = karpathy_tasks(data, root, splits, skipped)
    elif isinstance(data, list):
        tasks = list_tasks(data, root, skipped)
    else:
        raise ValueError(f"{annotations}: expected COCO captions ({{images, annotations}}), Karpathy's "
                         f"dataset_coco.json ({{images: [{{sentences}}]}}) or a list of {{image, caption}}")
    return write_images(tasks, out_dir, prefix, per_shard, processes, "images", annotations, skipped)
