"""RefCOCO, RefCOCO+ and RefCOCOg to region shards for grounding (`x2vlm make-shards --format refcoco`).

The published files of each data set: `refs(unc).p` (RefCOCO, RefCOCO+) or `refs(umd).p` / `refs(google).p`
(RefCOCOg), a Python pickle of a list of {"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent", "raw",
"sent_id"}], ...}, and `instances.json` (COCO-style {"images": [{"id", "file_name", "width", "height"}],
"annotations": [{"id", "image_id", "bbox": [x, y, w, h]}]}). The pickle is read by an unpickler that builds plain
containers and scalars only: a pickle that names any class or function is refused. The annotations may be given
as the data set's folder (holding both files) or as the pickle, with `instances` beside it or named.

One sample per image of the chosen split (train, val, testA, testB; RefCOCOg: train, val, test; several joined
by commas): every referring expression is a region, its box the referred object's COCO box in pixels, with
"ref_id", "ann_id" and "sent_id"; the image has no caption (a region source, or `x2vlm evaluate --regions`).
Images are IMAGE_ROOT/file_name, or the COCO split folder that the file name names (train2014/).

Skipped and counted: refs that are not objects ("bad_entry"), refs whose object or image the instances do not
hold ("unknown_annotation", "unknown_image"), empty expressions ("empty_text"), boxes that are not four numbers
("bad_box"), missing or unreadable images.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from x2vlm.data.formats.coco import _find
from x2vlm.data.formats.common import read_json, read_plain_pickle, region, texts, write_images


def find_files(annotations: str, instances: str | None) -> tuple[str, str]:
    """(refs pickle, instances.json) from a data set folder or a pickle path."""
    path = Path(annotations)
    if path.is_dir():
        pickles = sorted(path.glob("refs(*).p"))
        if not pickles:
            raise FileNotFoundError(f"{path}: no refs(unc).p / refs(umd).p in this folder")
        path = pickles[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    inst = Path(instances) if instances else path.parent / "instances.json"
    if not inst.is_file():
        raise FileNotFoundError(f"{inst}: no such file (give --instances)")
    return str(path), str(inst)


def refcoco_tasks(refs: list, inst: dict, root: Path, splits: set, skipped: Counter):
    images = {im["id"]: im for im in inst.get("images") or [] if isinstance(im, dict) and "id" in im}
    boxes = {a["id"]: a.get("bbox") for a in inst.get("annotations") or [] if isinstance(a, dict) and "id" in a}
    by_image: dict = {}
    for ref in refs:
        if not isinstance(ref, dict):
            skipped["bad_entry"] += 1
            continue
        if ref.get("split") not in splits:
            continue
        if ref.get("ann_id") not in boxes:
            skipped["unknown_annotation"] += 1
            continue
        if ref.get("image_id") not in images:
            skipped["unknown_image"] += 1
            continue
        for s in ref.get("sentences") or []:
            phrases = texts(s.get("sent") or s.get("raw")) if isinstance(s, dict) else []
            r, why = region(boxes[ref["ann_id"]], phrases)
            if r is None:
                skipped[why] += 1
                continue
            r.update(ref_id=ref.get("ref_id"), ann_id=ref["ann_id"], sent_id=s.get("sent_id"))
            by_image.setdefault(ref["image_id"], []).append(r)
    for image_id, regions in by_image.items():
        im = images[image_id]
        size = (im.get("width"), im.get("height"))
        yield {"key": f"coco_{image_id}", "image": _find(root, str(im.get("file_name"))),
               "size": size if all(isinstance(v, (int, float)) and v > 0 for v in size) else None,
               "captions": [], "regions": regions, "fields": {"image_id": image_id}}


def refcoco_to_shards(annotations: str, image_root: str, out_dir: str, prefix: str = "data", per_shard: int = 1000,
                      processes: int = 1, split: str | None = None, instances: str | None = None) -> list:
    """One split of RefCOCO / RefCOCO+ / RefCOCOg -> region shards."""
    if not split:
        raise ValueError("refcoco: give the split to convert (train, val, testA, testB; RefCOCOg: train, val, test)")
    refs_path, inst_path = find_files(annotations, instances)
    refs, inst = read_plain_pickle(refs_path), read_json(inst_path)
    if not isinstance(refs, list) or not isinstance(inst, dict):
        raise ValueError(f"{refs_path}: expected a list of refs, and {inst_path} COCO instances")
    splits = {s.strip() for s in split.split(",")}
    known = {r.get("split") for r in refs if isinstance(r, dict)}
    if not splits & known:
        raise ValueError(f"{refs_path}: no ref in split {split!r} (the file has {', '.join(sorted(map(str, known)))})")
    skipped: Counter = Counter()
    return write_images(refcoco_tasks(refs, inst, Path(image_root), splits, skipped), out_dir, prefix, per_shard,
                        processes, f"images ({split})", refs_path, skipped)
