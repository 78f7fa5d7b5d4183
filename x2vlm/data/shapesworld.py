"""ShapesWorld: a synthetic image-text-region data set that a tiny model can learn on a CPU in minutes.

Each image shows 1-4 non-overlapping shapes (circle, square, triangle, diamond) in clearly different colours
on a dark, noisy, randomly tinted background. The caption names every shape with its colour and position; each
shape is also a region with its box (x, y, w, h in pixels) and a short phrase. A few colour-shape pairs never
appear in the training split; the held-out split draws from all pairs and marks images that show one.
Deterministic by seed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 50),
    "purple": (160, 70, 210), "orange": (245, 140, 30), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond")
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("white", "diamond")})
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
TRAIN_PAIRS = [p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS]


def position_words(cx: float, cy: float, size: int) -> str:
    """'top left', 'bottom', 'center', ... from a shape's centre."""
    h = "left" if cx < 0.38 * size else "right" if cx > 0.62 * size else ""
    v = "top" if cy < 0.38 * size else "bottom" if cy > 0.62 * size else ""
    return f"{v} {h}".strip() or "center"


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    x, y, w, h = box
    if shape == "circle":
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + w / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=colour)
    else:  # diamond
        draw.polygon([(x + w / 2, y), (x + w - 1, y + h / 2), (x + w / 2, y + h - 1), (x, y + h / 2)], fill=colour)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0, 80, size=3)
    tilt = rng.uniform(-25, 25, size=(2, 3))
    ramp = np.linspace(-0.5, 0.5, size)
    img = base + ramp[:, None, None] * tilt[0] + ramp[None, :, None] * tilt[1]
    img = img + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(img, 0, 100).astype(np.uint8)


def _place(rng: np.random.Generator, n: int, size: int):
    """n non-overlapping square boxes (with a 2 px gap), or fewer if the canvas is too crowded."""
    boxes = []
    for _ in range(200):
        if len(boxes) == n:
            break
        s = int(rng.integers(round(0.22 * size), round(0.38 * size) + 1))
        x, y = (int(v) for v in rng.integers(0, size - s + 1, size=2))
        if all(x + s + 2 <= bx or bx + bw + 2 <= x or y + s + 2 <= by or by + bh + 2 <= y
               for bx, by, bw, bh in boxes):
            boxes.append((x, y, s, s))
    return boxes


def _a(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def _caption(rng: np.random.Generator, parts: list) -> str:
    """Every shape with its colour and position; for two or more, one pairwise relation up front."""
    descr = [f"{_a(c)} {c} {s} at the {p}" if p != "center" else f"{_a(c)} {c} {s} in the center"
             for c, s, p, _ in parts]
    if len(parts) >= 2 and rng.random() < 0.5:
        (c1, s1, _, b1), (c2, s2, _, b2) = parts[0], parts[1]
        dx = (b2[0] + b2[2] / 2) - (b1[0] + b1[2] / 2)
        dy = (b2[1] + b2[3] / 2) - (b1[1] + b1[3] / 2)
        rel = ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
        rest = descr[2:]
        text = f"{_a(c1)} {c1} {s1} {rel} {_a(c2)} {c2} {s2}"
        return text + (", and " + ", ".join(rest) if rest else "")
    lead = ["", "there is ", "an image with "][int(rng.integers(3))]
    if len(descr) == 1:
        return lead + descr[0]
    return lead + ", ".join(descr[:-1]) + " and " + descr[-1]


def _phrase(rng: np.random.Generator, colour: str, shape: str, pos: str) -> str:
    k = int(rng.integers(3))
    if k == 0:
        return f"the {colour} {shape}"
    if k == 1:
        return f"{colour} {shape}"
    return f"the {colour} {shape} in the {pos}" if pos == "center" else f"the {colour} {shape} at the {pos}"


def make_sample(rng: np.random.Generator, pairs: list, size: int, key: str) -> dict:
    n = int(rng.integers(1, 5))
    boxes = _place(rng, n, size)
    chosen = rng.choice(len(pairs), size=len(boxes), replace=False)
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    parts = []
    for idx, box in zip(chosen, boxes):
        colour, shape = pairs[int(idx)]
        _draw(draw, shape, box, COLOURS[colour])
        parts.append((colour, shape, position_words(box[0] + box[2] / 2, box[1] + box[3] / 2, size), box))
    regions = [{"box": [float(v) for v in b], "phrase": _phrase(rng, c, s, p)} for c, s, p, b in parts]
    return {"key": key, "image": img, "caption": _caption(rng, parts), "regions": regions,
            "unseen": any((c, s) in HELD_OUT_PAIRS for c, s, _, _ in parts), "n_shapes": len(parts)}


def generate(split: str, n: int, seed: int = 0, image_size: int = 64) -> list:
    """`n` samples of the 'train' split (held-out colour-shape pairs never appear) or the 'heldout' split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    return [make_sample(rng, pairs, image_size, f"{split}{i:07d}") for i in range(n)]


def corpus(samples) -> list:
    """All texts of the samples: captions and region phrases (for training a tokenizer)."""
    out = []
    for s in samples:
        out.append(s["caption"])
        out.extend(r["phrase"] for r in s["regions"])
    return out
