"""From shards to batches: one DataLoader per source, batches built (augmented, tokenised, masked) in the workers.

Batch format (the model's contract):
    images [N, 3, H, W] float; text_ids, text_atts, mlm_ids, mlm_labels [M, L] long (mlm_labels -100 where not
    masked); image_idx [M] long (text -> image); boxes [M, 4] float pixel (x, y, w, h) in the augmented image,
    (0, 0, W, H) for whole-image captions; is_region [M] bool; skipped {kind: count} (bad input skipped since
    the previous batch of this worker); keys [N].
An "image" source gives one caption per image (M == N; training draws one of an image's captions). A "region"
source gives per image its caption and up to max_texts - 1 randomly chosen region phrases (with_caption: false, or
an image without a caption: up to max_texts phrases), the texts of one image next to each other. A "video" source gives
"videos" [N, F, 3, H, W] (clips sampled at `fps` frames per second, padded to the batch's longest clip) and
"frame_mask" [N, F] bool instead of "images", and one caption per clip; its frames are resized only (no crop,
no flip: captions speak of directions). batch_size counts images (clips). Training loaders repeat their shards
forever; evaluation loaders read them once.
"""
from __future__ import annotations

import os
import warnings
import zlib

import numpy as np
import torch

from x2vlm.config import DataConfig, LossConfig, SourceConfig
from x2vlm.data.masking import mask_batch
from x2vlm.data.samples import ClipDecoder, ImageDecoder, add_counts, decode_image
from x2vlm.data.shards import ShardStream
from x2vlm.data.tokenizer import tokenize
from x2vlm.data.transforms import eval_transform, frames_to_tensor, train_transform


def up_to(n: int, k: int, rng: np.random.Generator, train: bool) -> list[int]:
    """Indices of up to k of n texts: drawn at random without repeats when training, else the first k."""
    return rng.permutation(n)[:k].tolist() if train else list(range(min(n, k)))


class Batcher:
    """Decoded samples -> one batch in the format above."""

    def __init__(self, kind: str, tokenizer, image_size: int, max_len: int, loss_cfg: LossConfig,
                 max_texts: int = 5, train: bool = True, scale_min: float = 0.5, hflip: bool = True,
                 with_caption: bool = True):
        if kind not in ("image", "region", "video", "video_qa"):
            raise ValueError(f"source kind: expected 'image', 'region', 'video' or 'video_qa', got {kind!r}")
        self.kind, self.tok, self.size, self.max_len, self.loss_cfg = kind, tokenizer, image_size, max_len, loss_cfg
        self.max_texts, self.train, self.scale_min, self.hflip = max_texts, train, scale_min, hflip
        # A region source without captions gives up to max_texts phrases per image (an image without regions
        # then gives its caption); with captions, the caption and up to max_texts - 1 phrases.
        self.with_caption = with_caption or kind != "region"

    def texts_of(self, sample: dict, rng: np.random.Generator):
        """(image tensor, [(text, box, is_region)]) of one sample, after augmentation."""
        meta = sample["json"]
        regions = (meta.get("regions") or []) if self.kind == "region" else []
        boxes = [r["box"] for r in regions]
        caption = meta.get("caption") or ""  # (a region sample may have none; the decoder then gave regions)
        use_caption = bool(caption) and (self.with_caption or not regions)
        if self.train:
            texts = [caption] + [r["phrase"] for r in regions]
            anchor = int(rng.integers(len(regions))) if regions else None
            tensor, boxes, kept = train_transform(sample["image"], boxes, texts, self.size, rng, self.scale_min,
                                                  self.hflip, anchor)
        else:
            tensor, boxes = eval_transform(sample["image"], boxes, self.size)
            kept = list(range(len(regions)))
        order = up_to(len(kept), self.max_texts - use_caption, rng, self.train)
        whole = [0.0, 0.0, float(self.size), float(self.size)]
        items = [(regions[kept[j]]["phrase"], boxes[j], True) for j in order]
        if use_caption:
            items.insert(0, (caption, whole, False))
        return tensor, items

    def __call__(self, samples: list, skipped: dict, rng: np.random.Generator, gen: torch.Generator) -> dict:
        images, texts, boxes, is_region, image_idx = [], [], [], [], []
        for n, s in enumerate(samples):
            tensor, items = self.texts_of(s, rng)
            images.append(tensor)
            for text, box, region in items:
                texts.append(text)
                boxes.append(box)
                is_region.append(region)
                image_idx.append(n)
        return {"images": torch.stack(images), **self.text_fields(texts, gen),
                "image_idx": torch.tensor(image_idx, dtype=torch.long),
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "is_region": torch.tensor(is_region, dtype=torch.bool),
                "skipped": dict(skipped), "keys": [s["key"] for s in samples]}

    def text_fields(self, texts: list, gen: torch.Generator) -> dict:
        """Token ids, attention masks and the MLM-masked copy of a batch's texts."""
        enc = tokenize(self.tok, texts, self.max_len)
        lc = self.loss_cfg
        mlm_ids, mlm_labels = mask_batch(self.tok, enc, lc.mlm_prob, lc.max_masks, lc.span_prob, gen)
        return {"text_ids": enc["input_ids"], "text_atts": enc["attention_mask"], "mlm_ids": mlm_ids.long(),
                "mlm_labels": mlm_labels.long()}


def pad_clips(clips: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips [T_i, 3, H, W] -> videos [N, max T, 3, H, W] (zero padding) and frame_mask [N, max T]."""
    f = max(len(c) for c in clips)
    videos = clips[0].new_zeros(len(clips), f, *clips[0].shape[1:])
    frame_mask = torch.zeros(len(clips), f, dtype=torch.bool)
    for i, c in enumerate(clips):
        videos[i, :len(c)] = c
        frame_mask[i, :len(c)] = True
    return videos, frame_mask


def instance_id(name: str) -> int:
    """A video's id as an integer that every rank computes alike (positives by video id in retrieval)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


class VideoBatcher(Batcher):
    """Decoded clips -> a batch with "videos", "frame_mask" and one caption per clip; clips with a "video_id"
    also give "instance_ids" (texts of one video are all positives in ITC, never ITM negatives)."""

    def __call__(self, samples: list, skipped: dict, rng: np.random.Generator, gen: torch.Generator) -> dict:
        videos, frame_mask = pad_clips([frames_to_tensor(s["frames"], self.size) for s in samples])
        n = len(samples)
        batch = {"videos": videos, "frame_mask": frame_mask,
                 **self.text_fields([s["json"]["caption"] for s in samples], gen),
                 "image_idx": torch.arange(n), "boxes": torch.tensor([[0.0, 0.0, self.size, self.size]] * n),
                 "is_region": torch.zeros(n, dtype=torch.bool), "skipped": dict(skipped),
                 "keys": [s["key"] for s in samples]}
        ids = [s["json"].get("video_id") for s in samples]
        if all(isinstance(v, str) for v in ids):
            batch["instance_ids"] = torch.tensor([instance_id(v) for v in ids])
        return batch


class VideoQABatcher(Batcher):
    """Decoded clips with questions -> "videos", "frame_mask", the question tokens and "answer_labels" (-1: an
    answer outside the vocabulary, ignored by the loss). Each clip brings up to `max_texts` of its questions
    (training draws them at random, without repeats; evaluation takes the first), next to each other: a clip is
    decoded and encoded once for all of them, and the questions are what the fusion encoder learns from."""

    def __call__(self, samples: list, skipped: dict, rng: np.random.Generator, gen: torch.Generator) -> dict:
        videos, frame_mask = pad_clips([frames_to_tensor(s["frames"], self.size) for s in samples])
        picked, clip_of = [], []
        for i, s in enumerate(samples):
            qa = s["json"]["qa"]
            order = up_to(len(qa), self.max_texts, rng, self.train)
            picked += [qa[j] for j in order]
            clip_of += [i] * len(order)
        enc = tokenize(self.tok, [q["question"] for q in picked], self.max_len)
        return {"videos": videos, "frame_mask": frame_mask, "text_ids": enc["input_ids"],
                "text_atts": enc["attention_mask"], "image_idx": torch.tensor(clip_of),
                "answer_labels": torch.tensor([q["label"] for q in picked]), "skipped": dict(skipped),
                "keys": [s["key"] for s in samples]}


class SourceBatches(torch.utils.data.IterableDataset):
    """Batches of one source from a ShardStream; the last partial batch of a finite pass is kept.

    Each batch carries "_position" {"worker", "epoch", "next", "open", "drawn", "batch"}: the worker that made it,
    where that worker's stream stands after it (a ShardStream position), and how many batches the worker has
    made; all of it small and JSON-able. A batch's random numbers (augmentation, masking) come from a generator
    keyed by (seed, rank, worker, batch number), so `resume_at` with saved positions continues the very same
    sequence of batches."""

    def __init__(self, stream: ShardStream, batcher: Batcher, batch_size: int, seed: int):
        self.stream, self.batcher, self.batch_size, self.seed = stream, batcher, batch_size, seed
        self.batches: dict[int, int] = {}

    def resume_at(self, positions: dict, consumed: int, num_workers: int) -> None:
        """Continue from saved positions {worker: batch position} after `consumed` batches were taken."""
        offset = consumed % max(1, num_workers)
        self.stream.resume_at(positions, offset)
        self.batches = {int(w): int(p["batch"]) for w, p in positions.items()}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + self.stream.worker_offset) % (info.num_workers if info else 1)
        count = self.batches.get(worker, 0)
        chunk, skipped, pos = [], {}, None

        def batch():
            nonlocal count
            rng = np.random.default_rng([self.seed, self.stream.rank, worker, count])
            gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
            out = self.batcher(chunk, skipped, rng, gen)
            count += 1
            out["_position"] = {"worker": worker, **pos, "batch": count}
            return out

        for item in self.stream:
            add_counts(skipped, item.pop("_skipped", None))
            if "key" not in item:
                continue
            pos = item.pop("_pos")
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield batch()
                chunk, skipped = [], {}
        if chunk:
            yield batch()
        elif skipped:
            warnings.warn(f"bad samples at the end of the shards, after the last batch: {skipped}", stacklevel=2)


def decoder(source: SourceConfig, train: bool):
    """The sample decoder of a source's kind (a region source accepts images known by their regions only)."""
    if source.kind in ("video", "video_qa"):
        return ClipDecoder(source.fps, source.max_frames, source.min_frames, train,
                           needs="qa" if source.kind == "video_qa" else "caption", seek=source.seek,
                           keyframe_tolerance=source.keyframe_tolerance)
    return ImageDecoder(needs_caption=source.kind == "image", train=train)


def build_loader(source: SourceConfig, data_cfg: DataConfig, tokenizer, image_size: int, max_len: int,
                 loss_cfg: LossConfig, seed: int, train: bool = True, rank: int | None = None,
                 world_size: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of batches of one source: endless and augmented when `train`, one plain pass otherwise."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenise; no threads inside them
    workers = data_cfg.num_workers
    stream = ShardStream(source.shards, decoder(source, train), seed=seed, infinite=train, shuffle=train, rank=rank,
                         world_size=world_size, num_workers=workers, open_shards=data_cfg.open_shards if train else 1,
                         cache_dir=data_cfg.remote_cache)
    kind = {"video": VideoBatcher, "video_qa": VideoQABatcher}.get(source.kind, Batcher)
    batcher = kind(source.kind, tokenizer, image_size, max_len, loss_cfg, source.max_texts, train,
                   data_cfg.crop_scale_min, data_cfg.hflip, source.with_caption)
    # The loader's own generator: creating its workers draws no number from the global generator.
    return torch.utils.data.DataLoader(SourceBatches(stream, batcher, source.batch_size, seed), batch_size=None,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(seed))


def build_loaders(data_cfg: DataConfig, tokenizer, image_size: int, max_len: int, loss_cfg: LossConfig,
                  seed: int, train: bool = True, rank: int | None = None, world_size: int | None = None) -> dict:
    """One loader per source, by source name. All ranks must pass the same seed (it orders the shards)."""
    return {s.name: build_loader(s, data_cfg, tokenizer, image_size, max_len, loss_cfg, seed + 100003 * i, train,
                                 rank, world_size)
            for i, s in enumerate(data_cfg.sources)}


def iterate_samples(shards, decode=decode_image, skipped: dict | None = None):
    """Decoded samples of the shards in order (one pass, one process, no augmentation): images by default, clips
    with a ClipDecoder. Bad input is skipped, added to `skipped` when given, and reported in a warning."""
    stream = ShardStream(shards, decode, infinite=False, shuffle=False, rank=0, world_size=1)
    counts: dict = {}
    for item in stream:
        add_counts(counts, item.pop("_skipped", None))
        item.pop("_pos", None)
        if "key" in item:
            yield item
    if skipped is not None:
        add_counts(skipped, counts)
    if counts:
        warnings.warn(f"skipped while reading {len(stream.shards)} shard(s): {counts}", stacklevel=2)
