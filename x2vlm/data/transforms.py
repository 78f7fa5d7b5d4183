"""Box-aware image transforms. Boxes are (x, y, w, h) in pixels and follow every crop, flip and resize."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

MEAN, STD = 0.5, 0.5
SIDE_WORDS = ("left", "right")


def to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD


def _crop_window(rng: random.Random, w: int, h: int, scale_min: float, keep=None):
    """A RandomResizedCrop-style window (area share in [scale_min, 1], aspect 3/4..4/3) that contains the box
    `keep` when one is given; falls back to the whole image."""
    for _ in range(10):
        area = w * h * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if not (0 < cw <= w and 0 < ch <= h):
            continue
        if keep is None:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
        kx, ky, kw, kh = keep
        if kw > cw or kh > ch:
            continue
        lo_x, hi_x = max(0, math.ceil(kx + kw - cw)), min(w - cw, int(kx))
        lo_y, hi_y = max(0, math.ceil(ky + kh - ch)), min(h - ch, int(ky))
        if lo_x <= hi_x and lo_y <= hi_y:
            return rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y), cw, ch
    return 0, 0, w, h


def crop_boxes(boxes, window, min_inside: float = 0.5):
    """Boxes moved into the crop window, clipped; a box keeps its place only if more than `min_inside` of its
    area lies inside (else None)."""
    cx, cy, cw, ch = window
    out = []
    for x, y, bw, bh in boxes:
        x0, y0 = max(x, cx), max(y, cy)
        x1, y1 = min(x + bw, cx + cw), min(y + bh, cy + ch)
        inside = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        out.append([x0 - cx, y0 - cy, x1 - x0, y1 - y0] if inside > min_inside * bw * bh else None)
    return out


def train_transform(image: Image.Image, boxes, texts, size: int, scale_min: float, hflip: bool,
                    rng: random.Random, keep_index: int | None = None):
    """Random crop (keeping box `keep_index` whole), resize to size x size, horizontal flip unless a text says
    left or right. Returns (tensor, boxes in output pixels or None where a box was cropped away)."""
    w, h = image.size
    keep = boxes[keep_index] if keep_index is not None and boxes else None
    window = _crop_window(rng, w, h, scale_min, keep)
    boxes = crop_boxes(boxes, window)
    cx, cy, cw, ch = window
    image = image.crop((cx, cy, cx + cw, cy + ch)).resize((size, size), Image.BICUBIC)
    sx, sy = size / cw, size / ch
    boxes = [None if b is None else [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
    sided = any(word in t.lower().split() for t in texts for word in SIDE_WORDS)
    if hflip and not sided and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes = [None if b is None else [size - b[0] - b[2], b[1], b[2], b[3]] for b in boxes]
    return to_tensor(image), boxes


def eval_transform(image: Image.Image, boxes, size: int):
    """Resize to size x size; boxes scaled alike."""
    w, h = image.size
    sx, sy = size / w, size / h
    image = image.resize((size, size), Image.BICUBIC) if (w, h) != (size, size) else image
    return to_tensor(image), [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
