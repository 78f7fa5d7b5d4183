"""WebDataset shards: a writer, and a streaming reader split across ranks and DataLoader workers.

A sample is `KEY.jpg` (the image) + `KEY.json` ({"caption": str, "regions": [{"box": [x, y, w, h], "phrase":
str}], ...}); boxes are in pixels. Image-text samples have no regions.

Reading: every epoch all ranks shuffle the shard list with the same seed, then global worker
g = rank * workers + worker takes shards g, g + T, g + 2T, ... (T = ranks * workers), so no shard is read twice
or missed within an epoch. Bad samples are skipped and counted by kind; the counts ride on the next good
sample as `_skipped` so that they reach the training loop from inside DataLoader workers.
"""
from __future__ import annotations

import glob
import io
import json
import os
import random
from pathlib import Path

import torch
from braceexpand import braceexpand
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(patterns) -> list:
    """Globs and brace patterns -> sorted, de-duplicated paths. A pattern that matches nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        found = []
        for p in braceexpand(str(pattern)):
            found.extend(sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else ([p] if os.path.exists(p) else []))
        if not found:
            raise FileNotFoundError(f"no shard matches {str(pattern)!r}")
        out.extend(found)
    return sorted(dict.fromkeys(out))


def write_shards(samples, out_dir: str, prefix: str, samples_per_shard: int, quality: int = 95) -> list:
    """Write samples ({"key", "image": PIL image, "caption", "regions", any other JSON-able fields}) to
    `out_dir/prefix-000000.tar`, ...; returns the shard paths."""
    import webdataset as wds

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths, writer, count = [], None, 0
    for s in samples:
        if writer is None or count == samples_per_shard:
            if writer is not None:
                writer.close()
            paths.append(str(Path(out_dir) / f"{prefix}-{len(paths):06d}.tar"))
            writer, count = wds.TarWriter(paths[-1], encoder=False), 0
        buf = io.BytesIO()
        s["image"].convert("RGB").save(buf, format="JPEG", quality=quality)
        meta = {k: v for k, v in s.items() if k not in ("key", "image")}
        writer.write({"__key__": s["key"], "jpg": buf.getvalue(), "json": json.dumps(meta).encode()})
        count += 1
    if writer is not None:
        writer.close()
    return paths


def _tar_samples(path: str):
    """(key, {ext: bytes}) for each sample of a tar file, files of one key grouped together."""
    import tarfile

    with tarfile.open(path) as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            k, _, ext = name.partition(".")
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext.lower()] = tar.extractfile(member).read()
        if files:
            yield key, files


def decode_sample(key: str, files: dict):
    """(sample, None) or (None, kind of damage). sample = {"key", "image": PIL RGB, "json": dict}."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, "no_image"
    if "json" not in files:
        return None, "no_json"
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except UnicodeDecodeError:
        return None, "bad_text_encoding"
    except ValueError:
        return None, "bad_json"
    if not isinstance(meta, dict):
        return None, "bad_json"
    caption = meta.get("caption")
    if not isinstance(caption, str):
        return None, "bad_json"
    if not caption.strip():
        return None, "empty_text"
    regions = meta.get("regions") or []
    if not isinstance(regions, list):
        return None, "bad_json"
    try:
        image = Image.open(io.BytesIO(files[ext]))
        image.load()
        image = image.convert("RGB")
    except Exception:
        return None, "bad_image"
    return {"key": key, "image": image, "json": meta}, None


def clean_regions(meta: dict, width: int, height: int):
    """Regions with a usable box and phrase, clipped to the image; returns (regions, number dropped)."""
    keep, dropped = [], 0
    for r in meta.get("regions") or []:
        box = r.get("box") if isinstance(r, dict) else None
        phrase = r.get("phrase") if isinstance(r, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and isinstance(phrase, str) and phrase.strip()):
            dropped += 1
            continue
        x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x1, y1 = min(float(width), float(box[0]) + float(box[2])), min(float(height), float(box[1]) + float(box[3]))
        if x1 - x0 < 1 or y1 - y0 < 1:
            dropped += 1
            continue
        keep.append({"box": [x0, y0, x1 - x0, y1 - y0], "phrase": phrase.strip()})
    return keep, dropped


def dist_info(rank=None, world_size=None):
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples from shards, split across ranks and workers, skipping and counting bad input.

    infinite=True repeats epochs with a new shard order each (training); False reads one pass (evaluation).
    """

    def __init__(self, shards, seed: int = 0, infinite: bool = True, shuffle: bool = True, buffer: int = 64,
                 rank: int | None = None, world_size: int | None = None, num_workers: int | None = None):
        self.shards = expand_shards(shards)
        self.seed, self.infinite, self.shuffle, self.buffer = seed, infinite, shuffle, buffer
        self.rank, self.world_size = dist_info(rank, world_size)
        if num_workers is not None:
            self.check_enough(num_workers)

    def check_enough(self, num_workers: int) -> None:
        total = self.world_size * max(1, num_workers)
        if len(self.shards) < total:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} rank(s) x "
                             f"{max(1, num_workers)} worker(s); write at least {total} shards "
                             f"(or use fewer workers)")

    def my_shards(self, epoch: int, worker: int, num_workers: int) -> list:
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        total = self.world_size * num_workers
        g = self.rank * num_workers + worker
        return order[g::total]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        self.check_enough(num_workers)
        rng = random.Random(self.seed * 1000003 + self.rank * 1009 + worker)
        skipped: dict = {}
        epoch = 0
        while True:
            buf = []
            for path in self.my_shards(epoch, worker, num_workers):
                try:
                    for key, files in _tar_samples(path):
                        sample, bad = decode_sample(key, files)
                        if bad:
                            skipped[bad] = skipped.get(bad, 0) + 1
                            continue
                        if skipped:
                            sample["_skipped"], skipped = skipped, {}
                        if not self.shuffle:
                            yield sample
                            continue
                        buf.append(sample)
                        if len(buf) >= self.buffer:
                            yield buf.pop(rng.randrange(len(buf)))
                except (OSError, EOFError, ValueError) as e:  # missing or truncated shard
                    kind = "missing_shard" if isinstance(e, FileNotFoundError) else "bad_shard"
                    skipped[kind] = skipped.get(kind, 0) + 1
            rng.shuffle(buf)
            yield from buf
            epoch += 1
            if not self.infinite:
                break
