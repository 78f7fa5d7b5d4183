"""Box-aware image transforms. Boxes are [x, y, w, h] in pixels and follow every crop, resize and flip.

train_transform: a RandomResizedCrop-style crop (area share in [scale_min, 1], aspect ratio 3/4..4/3) that
contains one chosen box whole, boxes kept when more than half of their area lies inside (clipped), a bicubic
resize to size x size, and a horizontal flip with p=0.5 unless a text speaks of left or right.
eval_transform: resize only. Both end in a float tensor [3, size, size] normalised with mean = std = 0.5.
frames_to_tensor: a clip's frames, resized and normalised as images.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image

MEAN, STD = 0.5, 0.5
SIDED = re.compile(r"\b(left|right)", re.IGNORECASE)


def to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD


def is_sided(texts) -> bool:
    """Whether any text mentions left or right (a mirrored image would contradict it)."""
    return any(SIDED.search(t) for t in texts)


def crop_window(rng: np.random.Generator, width: int, height: int, scale_min: float, keep=None, tries: int = 10):
    """(x, y, w, h) of a random crop that contains the box `keep` whole when given; the whole image when no
    try succeeds."""
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(tries):
        area = width * height * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if not (cw <= width and ch <= height):
            continue
        lo_x, hi_x, lo_y, hi_y = 0.0, width - cw, 0.0, height - ch
        if keep is not None:
            kx, ky, kw, kh = keep
            lo_x, hi_x = max(lo_x, kx + kw - cw), min(hi_x, kx)
            lo_y, hi_y = max(lo_y, ky + kh - ch), min(hi_y, ky)
            if lo_x > hi_x or lo_y > hi_y:
                continue
        return rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), cw, ch
    return 0.0, 0.0, float(width), float(height)


def crop_boxes(boxes, window, min_inside: float = 0.5):
    """Boxes relative to the crop window and clipped to it; (boxes, indices kept). A box is kept when more than
    `min_inside` of its area lies inside the window."""
    cx, cy, cw, ch = window
    out, kept = [], []
    for i, (x, y, w, h) in enumerate(boxes):
        x0, y0 = max(x, cx), max(y, cy)
        x1, y1 = min(x + w, cx + cw), min(y + h, cy + ch)
        inside = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        if w * h > 0 and inside > min_inside * w * h:
            out.append([x0 - cx, y0 - cy, x1 - x0, y1 - y0])
            kept.append(i)
    return out, kept


def train_transform(image: Image.Image, boxes, texts, size: int, rng: np.random.Generator,
                    scale_min: float = 0.5, hflip: bool = True, anchor: int | None = None):
    """Augment an image and its boxes. `anchor` indexes the box that the crop must contain whole.
    Returns (tensor [3, size, size], boxes in output pixels, indices of the input boxes kept)."""
    image = image.convert("RGB")
    keep = boxes[anchor] if anchor is not None else None
    window = crop_window(rng, image.width, image.height, scale_min, keep)
    out, kept = crop_boxes(boxes, window)
    cx, cy, cw, ch = window
    image = image.resize((size, size), Image.BICUBIC, box=(cx, cy, cx + cw, cy + ch))
    sx, sy = size / cw, size / ch
    out = [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in out]
    if hflip and not is_sided(texts) and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = [[size - x - w, y, w, h] for x, y, w, h in out]
    return to_tensor(image), out, kept


def eval_transform(image: Image.Image, boxes, size: int):
    """Resize to size x size. Returns (tensor [3, size, size], boxes in output pixels)."""
    image = image.convert("RGB")
    sx, sy = size / image.width, size / image.height
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return to_tensor(image), [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in boxes]


def frames_to_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size], resized (bilinear, antialiased) and normalised as images."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return (x - MEAN) / STD
