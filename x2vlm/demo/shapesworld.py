"""ShapesWorld: synthetic images of coloured shapes with captions and grounded region phrases.

    samples = generate("train", 1000, seed=0)       # list of dicts, deterministic by (split, seed, index)
    texts = corpus(samples)                          # captions and phrases, for training a tokenizer

Each image holds 1-4 non-overlapping shapes; no two share both colour and shape. A few (colour, shape) pairs
are held out: the "train" split never shows them, the "heldout" split draws from all pairs and marks a sample
`unseen` when it shows a held-out pair. Boxes are [x, y, w, h] in pixels.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "diamond")})
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
SPLITS = {"train": 1, "heldout": 2}
NUMBERS = {2: "two", 3: "three", 4: "four"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark or grey colour with a mild linear gradient and noise, far from every shape colour."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    while True:
        base = rng.uniform(15, 115, size=3) if rng.random() < 0.7 else np.full(3, rng.uniform(40, 120))
        if np.min(np.linalg.norm(palette - base, axis=1)) > 110:
            break
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    img = base[None, None, :] + rng.uniform(5, 20) * grad[:, :, None]
    img += rng.normal(0, 4, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=colour)
    elif shape == "cross":
        t = w / 6
        draw.rectangle([cx - t, y, cx + t, y1], fill=colour)
        draw.rectangle([x, cy - t, x1, cy + t], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, n: int, size: int) -> list:
    """Up to n non-overlapping square boxes (1 px apart) with sides of about 14-26 px on a 64 px canvas."""
    lo, hi = max(3, round(14 * size / 64)), max(4, round(26 * size / 64))
    boxes: list = []
    for _ in range(n):
        for attempt in range(200):
            s = int(rng.integers(lo, max(lo, hi - attempt // 40) + 1))
            x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            if all(x + s + 1 <= bx or bx + bs + 1 <= x or y + s + 1 <= by or by + bs + 1 <= y
                   for bx, by, bs, _ in boxes):
                boxes.append((x, y, s, s))
                break
    return boxes


def _where(box, size: int) -> str:
    """Position words for a box: "on the left", "at the top right", "in the center", ..."""
    x, y, w, h = box
    cx, cy = (x + w / 2) / size, (y + h / 2) / size
    horiz = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    vert = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    if horiz and vert:
        return f"at the {vert} {horiz}"
    if horiz:
        return f"on the {horiz}"
    if vert:
        return f"at the {vert}"
    return "in the center"


def _relation(a, b) -> str:
    """How box a lies relative to box b: "left of", "right of", "above" or "below"."""
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[3] / 2) - (b[1] + b[3] / 2)
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _join(parts: list) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(rng: np.random.Generator, objs: list, size: int) -> str:
    """One of a few templates; every template names every shape with its colour."""
    names = [f"{c} {s}" for c, s, _ in objs]
    placed = [f"{_article(n)} {n} {_where(b, size)}" for n, (_, _, b) in zip(names, objs)]
    t = int(rng.integers(0, 4))
    if len(objs) == 1:
        return [placed[0], f"there is {placed[0]}", f"a single {names[0]} {_where(objs[0][2], size)}",
                f"{placed[0]} on a plain background"][t]
    if t == 0:
        return _join(placed)
    if t == 1:
        rel = f"{_article(names[0])} {names[0]} {_relation(objs[0][2], objs[1][2])} {_article(names[1])} {names[1]}"
        return _join([rel] + placed[2:])
    if t == 2:
        return f"{NUMBERS[len(objs)]} shapes: " + _join(placed)
    rel = f"{_article(names[1])} {names[1]} {_relation(objs[1][2], objs[0][2])} {_article(names[0])} {names[0]}"
    return rel + (", with " + _join(placed[2:]) if len(objs) > 2 else "")


def _phrase(rng: np.random.Generator, colour: str, shape: str, box, size: int) -> str:
    t = int(rng.integers(0, 3))
    return [f"the {colour} {shape}", f"the {colour} {shape} {_where(box, size)}", f"{colour} {shape}"][t]


def make_sample(split: str, seed: int, index: int, image_size: int = 64) -> dict:
    """The sample at `index` of a split; depends only on (split, seed, index, image_size)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    boxes = _place(rng, int(rng.integers(1, 5)), image_size)
    chosen = rng.choice(len(pairs), size=len(boxes), replace=False)
    objs = [(pairs[i][0], pairs[i][1], b) for i, b in zip(chosen, boxes)]
    canvas = Image.fromarray(_background(rng, image_size))
    draw = ImageDraw.Draw(canvas)
    for colour, shape, box in objs:
        _draw(draw, shape, box, COLOURS[colour])
    regions = [{"box": [float(v) for v in box], "phrase": _phrase(rng, c, s, box, image_size), "colour": c,
                "shape": s} for c, s, box in objs]
    return {
        "key": f"{split}-s{seed}-{index:07d}",
        "image": canvas,
        "caption": _caption(rng, objs, image_size),
        "regions": regions,
        "unseen": any((c, s) in HELDOUT_PAIRS for c, s, _ in objs),
        "n_shapes": len(objs),
    }


def generate(split: str, n: int, seed: int = 0, image_size: int = 64, map_fn=map) -> list:
    """n samples of a split: {"key", "image" (PIL RGB), "caption", "regions", "unseen", "n_shapes"}. `map_fn`
    maps the sample maker over the indices in order (e.g. a process pool's map)."""
    return list(map_fn(partial(make_sample, split, seed, image_size=image_size), range(n)))


def corpus(samples) -> list:
    """Every text of the samples: captions and region phrases."""
    texts = []
    for s in samples:
        texts.append(s["caption"])
        texts.extend(r["phrase"] for r in s.get("regions") or [])
    return texts
