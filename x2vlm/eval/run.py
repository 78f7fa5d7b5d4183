"""Evaluate an exported checkpoint on held-out shards: image-text retrieval, grounding, video-text retrieval and the
direction-of-motion probe, video QA; each result with the protocol that pins its numbers."""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from x2vlm.config import ConfigError
from x2vlm.data.pipeline import iterate_samples, pad_clips
from x2vlm.data.samples import ClipDecoder, ImageDecoder
from x2vlm.data.shards import expand_shards
from x2vlm.data.tokenizer import tokenize
from x2vlm.data.transforms import eval_transform, frames_to_tensor
from x2vlm.eval.grounding import evaluate_grounding
from x2vlm.eval.retrieval import evaluate_retrieval
from x2vlm.eval.video import direction_probe
from x2vlm.eval.videoqa import evaluate_videoqa
from x2vlm.logs import progress
from x2vlm.pretrained import find_export, load_pretrained, read_config, weights_sha256


def make_tokenize(tokenizer, max_len: int):
    """texts -> (ids, atts) [M, L], as training tokenises them."""
    def tokenize_texts(texts):
        enc = tokenize(tokenizer, texts, max_len)
        return enc["input_ids"], enc["attention_mask"]
    return tokenize_texts


def clips(shards, fps: float = 1.0, max_frames: int = 8, min_frames: int = 1, needs: str | None = None,
          skipped: dict | None = None, seek: str = "exact", keyframe_tolerance: float = 0.5):
    """Decoded clips of video shards in shard order, sampled at `fps` at the evaluation offsets (no randomness)."""
    decoder = ClipDecoder(fps, max_frames, min_frames, train=False, needs=needs, seek=seek,
                          keyframe_tolerance=keyframe_tolerance)
    return iterate_samples(shards, decoder, skipped)


def nothing_to_evaluate(what: str, shards) -> ConfigError:
    """The one-line error for held-out shards without a usable `what`: an evaluation of nothing has no numbers."""
    files = expand_shards(shards)
    return ConfigError(f"no {what} in {len(files)} shard(s) ({', '.join(Path(p).name for p in files[:3])}"
                       f"{', ...' if len(files) > 3 else ''}): nothing to evaluate on")


def nonempty(items: list, what: str, shards) -> list:
    """`items`, refused (nothing_to_evaluate) when there are none."""
    if not items:
        raise nothing_to_evaluate(what, shards)
    return items


def loading(samples, limit: int | None, what: str):
    """The first `limit` samples (all when None), with a progress bar."""
    return progress(islice(samples, limit), total=limit, desc=f"reading {what}", unit=" samples")


def load_pool(shards, image_size: int):
    """Images and captions of image-text shards, one caption per image (its first), in shard order."""
    images, captions, _, _ = load_captioned_pool(shards, image_size)
    return images, [c[0] for c in captions]


def load_captioned_pool(shards, image_size: int, limit: int | None = None):
    """(images [N, 3, H, W], [[caption, ...] per image], instances [N], keys) of image-text shards in shard
    order (the first `limit` images when given): every caption of an image (its "captions", else its
    "caption"); images with equal "image_id" are one instance (an image without one is its own)."""
    images, captions, instances, keys, ids = [], [], [], [], {}
    for n, s in enumerate(loading(iterate_samples(shards), limit, "images")):
        img, _ = eval_transform(s["image"], [], image_size)
        images.append(img)
        captions.append(s["json"].get("captions") or [s["json"]["caption"]])
        image_id = s["json"].get("image_id")
        name = ("id", str(image_id)) if image_id is not None else ("sample", n)
        instances.append(ids.setdefault(name, len(ids)))
        keys.append(s["key"])
    return torch.stack(nonempty(images, "usable images", shards)), captions, torch.tensor(instances), keys


def load_grounding(shards, image_size: int, min_shapes: int = 2, limit: int | None = None):
    """(image, [(phrase, box)]) for images with at least `min_shapes` regions (with or without a caption), the
    first `limit` of them when given; boxes in output pixels."""
    out = []
    images = iterate_samples(shards, ImageDecoder(needs_caption=False))
    for s in progress(images, desc="reading grounding images", unit=" samples"):
        regions = s["json"].get("regions") or []
        if len(regions) < min_shapes:
            continue
        if limit is not None and len(out) >= limit:
            break
        img, boxes = eval_transform(s["image"], [r["box"] for r in regions], image_size)
        out.append((img, [(r["phrase"], list(map(float, b))) for r, b in zip(regions, boxes)]))
    return nonempty(out, f"usable images with at least {min_shapes} regions", shards)


def load_video_pool(shards, image_size: int, fps: float = 1.0, max_frames: int = 8, min_frames: int = 1,
                    limit: int | None = None, **seek):
    """Clips (padded to the longest, with a frame mask) and captions of video shards, in shard order (the first
    `limit` clips when given)."""
    samples = nonempty(list(loading(clips(shards, fps, max_frames, min_frames, needs="caption", **seek), limit,
                                    "clips")), "usable captioned clips", shards)
    videos, mask = pad_clips([frames_to_tensor(s["frames"], image_size) for s in samples])
    return videos, mask, [s["json"]["caption"] for s in samples]


def split_name(shards) -> str:
    """The name of the split a set of shards holds: their file prefix before the shard number ("heldout" for
    heldout-000000.tar), several joined by "+"."""
    names = sorted({Path(p).name.rsplit("-", 1)[0] for p in expand_shards(shards)})
    return "+".join(names)


def protocol(sha256: str, shards, **settings) -> dict:
    """What an evaluation's numbers depend on besides the code: the weights (sha256 of the export), the split
    and its shard files, and the settings (resolution, frame sampling, re-rank depth, sizes)."""
    files = [Path(p).name for p in expand_shards(shards)]
    return {"checkpoint_sha256": sha256, "split": split_name(shards), "shards": files, **settings}


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, image_shards=(), region_shards=(), rerank_k: int = 16,
                        video_shards=(), fps: float = 1.0, max_frames: int = 8, videoqa_shards=(),
                        probe_direction: bool = True, seek: str = "exact", keyframe_tolerance: float = 0.5,
                        image_size: int | None = None, min_regions: int = 2) -> dict:
    """Every evaluation the given shards allow, each with its `protocol`. Deterministic: no sampling (clips are
    read at the evaluation offsets), no dropout, the same numbers for the same checkpoint and shards. At another
    `image_size` than the checkpoint's, and with more frames per clip (`max_frames`) than its frame embedding
    covers, the model's tables are resized as it loads (a line says what was resized). Grounding takes the images
    with at least `min_regions` regions (1 for referring-expression data such as RefCOCO)."""
    folder = find_export(checkpoint)
    table = read_config(folder).model.video.max_frames
    clips_given = bool(video_shards or videoqa_shards)
    model, tokenizer, cfg = load_pretrained(folder, image_size=image_size,
                                            frames=max_frames if clips_given and max_frames > table else None)
    size = cfg.model.vision.image_size
    tokenize = make_tokenize(tokenizer, cfg.model.text.max_len)
    sha = weights_sha256(folder)
    result = {"checkpoint": str(folder), "checkpoint_sha256": sha, "image_size": size}
    seeking = {"seek": seek, **({"keyframe_tolerance": keyframe_tolerance} if seek == "keyframe" else {})}
    sampling = {"image_size": size, "fps": fps, "max_frames": max_frames, "aggregator": cfg.model.video.aggregator,
                **seeking}
    if image_shards:
        images, captions, instances, _ = load_captioned_pool(image_shards, size)
        texts = [c for caps in captions for c in caps]
        text_item = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        ids, atts = tokenize(texts)
        result["image_retrieval"] = {
            **evaluate_retrieval(model, images, ids, atts, rerank_k=rerank_k, text_item=text_item,
                                 instances=instances),
            "protocol": protocol(sha, image_shards, image_size=size, rerank_k=rerank_k, n_queries=len(texts),
                                 pool_size=len(images))}
    if region_shards:
        samples = load_grounding(region_shards, size, min_regions)
        result["grounding"] = {**evaluate_grounding(model, samples, tokenize, size),
                               "protocol": protocol(sha, region_shards, image_size=size, iou=0.5,
                                                    min_shapes=min_regions, n_images=len(samples))}
    if video_shards:
        videos, mask, captions = load_video_pool(video_shards, size, fps, max_frames, **seeking)
        ids, atts = tokenize(captions)
        setting = protocol(sha, video_shards, **sampling, rerank_k=rerank_k, n_queries=len(captions),
                           pool_size=len(videos))
        result["video_retrieval"] = {**evaluate_retrieval(model, videos, ids, atts, rerank_k=rerank_k,
                                                          frame_mask=mask), "protocol": setting}
        if probe_direction:
            result["video_direction"] = {**direction_probe(model, videos, mask, captions, tokenize),
                                         "protocol": protocol(sha, video_shards, **sampling)}
    if videoqa_shards:
        skipped: dict = {}
        qa = evaluate_videoqa(model, clips(videoqa_shards, fps, max_frames, needs="qa", skipped=skipped, **seeking),
                              tokenize, size)
        if not qa["n"]:
            raise nothing_to_evaluate("questions on usable clips", videoqa_shards)
        result["video_qa"] = {**qa, "skipped_clips": skipped,
                              "protocol": protocol(sha, videoqa_shards, **sampling, n_questions=qa["n"],
                                                   n_clips=qa.get("clips", 0))}
    return result
