"""Evaluate an exported checkpoint on held-out shards: retrieval over an image-text pool and grounding."""
from __future__ import annotations

import warnings

import torch

from x2vlm.data.pipeline import iterate_samples
from x2vlm.data.shards import expand_shards
from x2vlm.data.transforms import eval_transform
from x2vlm.eval.grounding import evaluate_grounding
from x2vlm.eval.retrieval import evaluate_retrieval
from x2vlm.eval.video import direction_probe
from x2vlm.train.checkpoint import find_export, load_pretrained, weights_sha256


def make_tokenize(tokenizer, max_len: int):
    def tokenize(texts):
        enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return tokenize


def load_pool(shards, image_size: int):
    """Images and captions of image-text shards, one caption per image, in shard order."""
    images, captions = [], []
    for s in iterate_samples(expand_shards(shards)):
        img, _ = eval_transform(s["image"], [], image_size)
        images.append(img)
        captions.append(s["json"]["caption"])
    return torch.stack(images), captions


def load_grounding(shards, image_size: int, min_shapes: int = 2):
    """(image, [(phrase, box)]) for images with at least `min_shapes` regions; boxes in output pixels."""
    out = []
    for s in iterate_samples(expand_shards(shards)):
        regions = s["json"].get("regions") or []
        if len(regions) < min_shapes:
            continue
        img, boxes = eval_transform(s["image"], [r["box"] for r in regions], image_size)
        out.append((img, [(r["phrase"], list(map(float, b))) for r, b in zip(regions, boxes)]))
    return out


def load_video_pool(shards, image_size: int, fps: float = 1.0, max_frames: int = 8, min_frames: int = 1):
    """Clips (padded to the longest, with a frame mask) and captions of video shards, in shard order; frames
    sampled at `fps` at the evaluation offsets (no randomness)."""
    from video.shards import iterate_video_samples
    from x2vlm.data.pipeline import frames_to_tensor

    clips, captions, skipped = [], [], {}
    for s in iterate_video_samples(expand_shards(shards), fps, max_frames, min_frames, train=False,
                                   skipped=skipped):
        clips.append(frames_to_tensor(s["frames"], image_size))
        captions.append(s["json"]["caption"])
    if skipped:
        warnings.warn(f"video pool: skipped {skipped}", stacklevel=2)
    f = max(len(c) for c in clips)
    videos = torch.zeros(len(clips), f, *clips[0].shape[1:])
    mask = torch.zeros(len(clips), f, dtype=torch.bool)
    for i, c in enumerate(clips):
        videos[i, :len(c)], mask[i, :len(c)] = c, True
    return videos, mask, captions


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, image_shards=(), region_shards=(), rerank_k: int = 16,
                        video_shards=(), fps: float = 1.0, max_frames: int = 8, videoqa_shards=()) -> dict:
    folder = find_export(checkpoint)
    model, tokenizer, cfg = load_pretrained(folder)
    size = cfg.model.vision.image_size
    tokenize = make_tokenize(tokenizer, cfg.model.text.max_len)
    result = {"checkpoint": str(folder), "checkpoint_sha256": weights_sha256(folder), "image_size": size}
    if image_shards:
        images, captions = load_pool(image_shards, size)
        ids, atts = tokenize(captions)
        result["image_retrieval"] = evaluate_retrieval(model, images, ids, atts, rerank_k=rerank_k)
    if region_shards:
        result["grounding"] = evaluate_grounding(model, load_grounding(region_shards, size), tokenize, size)
    if video_shards:
        videos, mask, captions = load_video_pool(video_shards, size, fps, max_frames)
        ids, atts = tokenize(captions)
        result["video_retrieval"] = {**evaluate_retrieval(model, videos, ids, atts, rerank_k=rerank_k,
                                                          frame_mask=mask),
                                     "fps": fps, "max_frames": max_frames}
        result["video_direction"] = direction_probe(model, videos, mask, captions, tokenize)
    if videoqa_shards:
        from video.shards import iterate_video_samples
        from x2vlm.eval.videoqa import evaluate_videoqa

        skipped: dict = {}
        clips = iterate_video_samples(expand_shards(videoqa_shards), fps, max_frames, skipped=skipped)
        result["video_qa"] = {**evaluate_videoqa(model, clips, tokenize, size), "skipped_clips": skipped,
                              "fps": fps, "max_frames": max_frames, "aggregator": cfg.model.video.aggregator}
    return result
