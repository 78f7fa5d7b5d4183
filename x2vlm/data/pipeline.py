"""From shards to training batches, one DataLoader per source. Batches are built inside the workers.

Batch format (what the model reads):
    images [N, 3, H, W] float; text_ids, text_atts, mlm_ids, mlm_labels [M, L] long (labels -100 = not masked);
    image_idx [M] (text -> image); boxes [M, 4] pixel (x, y, w, h) in the augmented image, (0, 0, W, H) for
    whole-image texts; is_region [M] bool; skipped {kind: count}; keys [N].
An image source gives one caption per image (M == N). A region source gives per image its caption plus up to
max_texts - 1 region phrases, texts of one image next to each other.
"""
from __future__ import annotations

import random

import torch

from x2vlm.config import DataConfig, LossConfig, SourceConfig
from x2vlm.data.masking import mask_tokens
from x2vlm.data.shards import ShardStream, clean_regions, expand_shards
from x2vlm.data.transforms import eval_transform, train_transform


class Batcher:
    """Turns decoded samples into the batch format above (tokenising and masking included)."""

    def __init__(self, kind: str, tokenizer, image_size: int, max_len: int, loss_cfg: LossConfig,
                 data_cfg: DataConfig, max_texts: int, train: bool = True):
        self.kind, self.tok, self.size, self.max_len = kind, tokenizer, image_size, max_len
        self.loss_cfg, self.data_cfg, self.max_texts, self.train = loss_cfg, data_cfg, max_texts, train
        self.special = [i for i in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                    tokenizer.mask_token_id, tokenizer.unk_token_id) if i is not None]

    def sample_texts(self, sample: dict, rng: random.Random, skipped: dict):
        """[(text, box or None, is_region)] and the image tensor, after augmentation."""
        image, meta = sample["image"], sample["json"]
        regions = []
        if self.kind == "region":
            regions, dropped = clean_regions(meta, *image.size)
            if dropped:
                skipped["bad_box"] = skipped.get("bad_box", 0) + dropped
            regions = rng.sample(regions, min(len(regions), self.max_texts - 1))
        texts = [meta["caption"].strip()] + [r["phrase"] for r in regions]
        boxes = [r["box"] for r in regions]
        if self.train:
            keep = rng.randrange(len(boxes)) if boxes else None
            tensor, boxes = train_transform(image, boxes, texts, self.size, self.data_cfg.crop_scale_min,
                                            self.data_cfg.hflip, rng, keep)
        else:
            tensor, boxes = eval_transform(image, boxes, self.size)
        full = [0.0, 0.0, float(self.size), float(self.size)]
        out = [(texts[0], full, False)]
        out += [(t, b, True) for t, b in zip(texts[1:], boxes) if b is not None]
        return tensor, out

    def __call__(self, samples: list, rng: random.Random, gen: torch.Generator) -> dict:
        skipped: dict = {}
        images, texts, boxes, is_region, image_idx = [], [], [], [], []
        for s in samples:
            for kind, n in (s.get("_skipped") or {}).items():
                skipped[kind] = skipped.get(kind, 0) + n
            tensor, items = self.sample_texts(s, rng, skipped)
            for text, box, region in items:
                texts.append(text)
                boxes.append(box)
                is_region.append(region)
                image_idx.append(len(images))
            images.append(tensor)
        enc = self.tok(texts, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        ids, atts = enc["input_ids"], enc["attention_mask"]
        word_ids = [enc.word_ids(i) for i in range(len(texts))]
        mlm_ids, mlm_labels = mask_tokens(ids, word_ids, self.special, self.tok.mask_token_id, len(self.tok),
                                          self.loss_cfg.mlm_prob, self.loss_cfg.max_masks,
                                          self.loss_cfg.span_prob, gen)
        return {"images": torch.stack(images), "text_ids": ids, "text_atts": atts, "mlm_ids": mlm_ids,
                "mlm_labels": mlm_labels, "image_idx": torch.tensor(image_idx),
                "boxes": torch.tensor(boxes, dtype=torch.float32), "is_region": torch.tensor(is_region),
                "skipped": skipped, "keys": [s["key"] for s in samples]}


class SourceBatches(torch.utils.data.IterableDataset):
    """Batches of one source, endlessly (training) or for one pass."""

    def __init__(self, stream: ShardStream, batcher: Batcher, batch_size: int, seed: int):
        self.stream, self.batcher, self.batch_size, self.seed = stream, batcher, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        s = self.seed * 7919 + self.stream.rank * 104729 + worker
        rng, gen = random.Random(s), torch.Generator().manual_seed(s)
        chunk = []
        for sample in self.stream:
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield self.batcher(chunk, rng, gen)
                chunk = []
        if chunk:
            yield self.batcher(chunk, rng, gen)


def build_loader(source: SourceConfig, data_cfg: DataConfig, tokenizer, image_size: int, max_len: int,
                 loss_cfg: LossConfig, seed: int, train: bool = True, rank: int | None = None,
                 world_size: int | None = None):
    stream = ShardStream(source.shards, seed=seed, infinite=train, shuffle=train, rank=rank,
                         world_size=world_size, num_workers=data_cfg.num_workers)
    batcher = Batcher(source.kind, tokenizer, image_size, max_len, loss_cfg, data_cfg, source.max_texts, train)
    ds = SourceBatches(stream, batcher, source.batch_size, seed)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=data_cfg.num_workers,
                                       persistent_workers=data_cfg.num_workers > 0,
                                       prefetch_factor=4 if data_cfg.num_workers > 0 else None)


def build_loaders(data_cfg: DataConfig, tokenizer, image_size: int, max_len: int, loss_cfg: LossConfig,
                  seed: int, rank: int | None = None, world_size: int | None = None) -> dict:
    """One endless loader per source, by source name."""
    return {s.name: build_loader(s, data_cfg, tokenizer, image_size, max_len, loss_cfg, seed, True, rank,
                                 world_size) for s in data_cfg.sources}


def iterate_samples(shards):
    """Decoded samples of the shards in order, one pass, one process (for evaluation). Bad samples are
    skipped and reported on standard error."""
    import sys

    stream = ShardStream(expand_shards(shards), infinite=False, shuffle=False, rank=0, world_size=1)
    skipped: dict = {}
    for s in stream:
        for kind, n in s.pop("_skipped", {}).items():
            skipped[kind] = skipped.get(kind, 0) + n
        yield s
    if skipped:
        print(f"[data] skipped while reading {len(stream.shards)} shard(s): {skipped}", file=sys.stderr)
