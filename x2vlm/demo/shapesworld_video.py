"""ShapesWorld video: short clips of coloured shapes where one shape moves and/or changes colour, encoded to
real mp4 (H.264, yuv420p) with PyAV, with a caption and typed question-answer pairs.

    clips = generate_clips("train", 200, seed=0)     # deterministic by (split, seed, index)
    texts = video_corpus(clips)                       # captions, questions and answers, for a tokenizer
    files = write_published_formats({"train": clips, "test": held}, "msrvtt/")  # MSRVTT / MSRVTT-QA files

Each clip (default 4 s at 8 fps, 64x64) shows 1-3 shapes with distinct shapes and colours on a ShapesWorld
background. One shape, the target, does one of three events, chosen by index % 3: "move" (it slides in a
straight line to the left, right, up or down, by 30-45 % of the frame), "turn" (it changes colour abruptly at
the middle frame) or "move_turn" (both). Among moving clips, directions cycle with index so that every block of
12 consecutive clips holds each direction exactly twice: direction answers are balanced. The other shapes stay
still, away from the target's path.

QA types (answers are single words): answerable from any one frame: "colour" (of a shape that keeps its
colour), "shape" (the shape with a given colour), "count"; answerable only from the order of frames
(TEMPORAL_TYPES): "direction" (which way the target moves), "moving_shape" (which shape moves),
"colour_change" (what colour the target turns), "colour_before" (its colour at the start).

Held-out pairs as in the image generator: the "train" split never shows a pair of HELDOUT_PAIRS in any frame
(the colour a shape turns to included); the "heldout" split draws from all pairs and sets meta["unseen"] when a
held-out pair is shown.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from video.encode import encode_video
from x2vlm.demo.shapesworld import ALL_PAIRS, COLOURS, HELDOUT_PAIRS, SPLITS, TRAIN_PAIRS, _article, _background, \
    _draw, _join

DIRECTIONS = ("left", "right", "up", "down")
EVENTS = ("move", "turn", "move_turn")
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SINGLE_FRAME_TYPES = frozenset({"colour", "shape", "count"})
TEMPORAL_TYPES = frozenset({"direction", "moving_shape", "colour_change", "colour_before"})
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_DIR_PHRASES = {"left": ("to the left", "left"), "right": ("to the right", "right"), "up": ("up", "upwards"),
                "down": ("down", "downwards")}


def _overlaps(a, b, margin: int = 1) -> bool:
    """Whether boxes [x, y, w, h] come closer than `margin` pixels."""
    return not (a[0] + a[2] + margin <= b[0] or b[0] + b[2] + margin <= a[0]
                or a[1] + a[3] + margin <= b[1] or b[1] + b[3] + margin <= a[1])


def _choose_objects(rng: np.random.Generator, pairs, n: int, turns: bool):
    """Target (colour, shape, colour it turns to or None) and up to n - 1 other (colour, shape): all shapes
    distinct, all colours (the turned-to colour included) distinct, every (colour, shape) shown in `pairs`."""
    allowed = set(pairs)
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    for colour, shape in order:
        to = None
        if turns:
            options = [c for c in COLOURS if c != colour and (c, shape) in allowed]
            if not options:
                continue
            to = options[int(rng.integers(len(options)))]
        break
    used_colours, used_shapes = {colour, to}, {shape}
    others = []
    for c, s in order:
        if len(others) == n - 1:
            break
        if c not in used_colours and s not in used_shapes:
            others.append((c, s))
            used_colours.add(c)
            used_shapes.add(s)
    return (colour, shape, to), others


def make_clip(split: str, seed: int, index: int, size: int = 64, seconds: float = 4, fps: float = 8) -> dict:
    """The clip at `index` of a split; depends only on (split, seed, index, size, seconds, fps)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
    n_frames = int(round(seconds * fps))
    if n_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got seconds={seconds} fps={fps}")
    rng = np.random.default_rng([seed, SPLITS[split], index, 2])  # a stream apart from the image generator's
    event = EVENTS[index % 3]
    moves, turns = event != "turn", event != "move"
    direction = DIRECTIONS[(index // 3) % 4] if moves else None
    (c1, shape, c2), others = _choose_objects(rng, TRAIN_PAIRS if split == "train" else ALL_PAIRS,
                                              int(rng.integers(1, 4)), turns)

    side = int(rng.integers(round(12 * size / 64), round(18 * size / 64) + 1))
    dist = int(rng.integers(round(0.30 * size), round(0.45 * size) + 1)) if moves else 0
    dx, dy = (d * dist for d in STEPS[direction]) if moves else (0, 0)
    x0 = int(rng.integers(max(0, -dx), size - side - max(0, dx) + 1))
    y0 = int(rng.integers(max(0, -dy), size - side - max(0, dy) + 1))
    swept = (min(x0, x0 + dx), min(y0, y0 + dy), side + abs(dx), side + abs(dy))
    placed = []
    for c, s in others:
        for _ in range(200):
            w = int(rng.integers(round(12 * size / 64), round(18 * size / 64) + 1))
            box = (int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - w + 1)), w, w)
            if not _overlaps(box, swept) and not any(_overlaps(box, b) for _, _, b in placed):
                placed.append((c, s, box))
                break

    background = _background(rng, size)
    change_frame = n_frames // 2 if turns else None
    frames = []
    for i in range(n_frames):
        canvas = Image.fromarray(background)
        draw = ImageDraw.Draw(canvas)
        for c, s, box in placed:
            _draw(draw, s, box, COLOURS[c])
        f = i / (n_frames - 1)
        box = (int(round(x0 + dx * f)), int(round(y0 + dy * f)), side, side)
        _draw(draw, shape, box, COLOURS[c2 if turns and i >= change_frame else c1])
        frames.append(np.asarray(canvas))
    mp4 = encode_video(frames, fps=fps, options={"preset": "veryfast", "crf": "20"}, threads=1)

    caption = _caption(rng, event, c1, shape, c2, direction, placed)
    qa = _questions(c1, shape, c2, direction, placed)
    shown = {(c1, shape), (c2, shape)} | {(c, s) for c, s, _ in placed}
    target = {"colour": c1, "shape": shape, "colour_to": c2, "direction": direction, "distance": dist,
              "start_box": [x0, y0, side, side], "end_box": [x0 + dx, y0 + dy, side, side],
              "change_frame": change_frame}
    meta = {"event": event, "target": target,
            "objects": [{"colour": c, "shape": s, "box": list(b)} for c, s, b in placed],
            "n_shapes": 1 + len(placed), "unseen": any(p in HELDOUT_PAIRS for p in shown if p[0] is not None),
            "size": size, "seconds": seconds, "fps": fps, "n_frames": n_frames}
    return {"key": f"{split}-s{seed}-v{index:07d}", "mp4": mp4, "caption": caption, "qa": qa, "meta": meta}


def _caption(rng, event, c1, shape, c2, direction, placed) -> str:
    a = _article(c1)
    if event == "move":
        dp = _DIR_PHRASES[direction][int(rng.integers(2))]
        options = [f"{a} {c1} {shape} moves {dp}", f"the {c1} {shape} slides {dp}", f"{a} {c1} {shape} is moving {dp}"]
    elif event == "turn":
        options = [f"{a} {c1} {shape} turns {c2}", f"the {c1} {shape} changes colour to {c2}",
                   f"{_article(shape)} {shape} changes from {c1} to {c2}"]
    else:
        dp = _DIR_PHRASES[direction][0]
        options = [f"{a} {c1} {shape} moves {dp} and turns {c2}", f"the {c1} {shape} turns {c2} while moving {dp}"]
    text = options[int(rng.integers(len(options)))]
    if placed:
        names = _join([f"{_article(c)} {c} {s}" for c, s, _ in placed])
        if rng.random() < 0.5:
            text += f", next to {names}"
        else:
            text += f" while {names} {'stays' if len(placed) == 1 else 'stay'} still"
    return text


def _questions(c1, shape, c2, direction, placed) -> list:
    qa = []

    def add(question, answer, kind):
        qa.append({"question": question, "answer": answer, "type": kind})

    still = [(c, s) for c, s, _ in placed] + ([(c1, shape)] if c2 is None else [])
    for c, s in still:
        add(f"what colour is the {s}?", c, "colour")
        add(f"what shape is the {c} one?", s, "shape")
    n = 1 + len(placed)
    add("how many shapes are there?", COUNT_WORDS[n], "count")
    name = f"the {c1} {shape}" if c2 is None else f"the {shape}"
    if direction is not None:
        add(f"which way does {name} move?", direction, "direction")
        add("which shape moves?", shape, "moving_shape")
    if c2 is not None:
        add(f"what colour does the {shape} turn?", c2, "colour_change")
        add(f"what colour is the {shape} at the start?", c1, "colour_before")
    return qa


def generate_clips(split: str, n: int, seed: int = 0, size: int = 64, seconds: float = 4, fps: float = 8,
                   map_fn=map) -> list:
    """n clips of a split: {"key", "mp4" (bytes), "caption", "qa": [{"question", "answer", "type"}], "meta"}.
    `map_fn` maps the clip maker over the indices in order (e.g. a process pool's map)."""
    return list(map_fn(partial(make_clip, split, seed, size=size, seconds=seconds, fps=fps), range(n)))


def video_corpus(clips) -> list:
    """Every text of the clips: captions, questions and answers."""
    texts = []
    for clip in clips:
        texts.append(clip["caption"])
        for pair in clip.get("qa") or []:
            texts.extend((pair["question"], pair["answer"]))
    return texts


def shard_samples(clips) -> list:
    """The clips as samples for x2vlm.data.samples.write_video_shards: {"key", "video", "json"}."""
    return [{"key": c["key"], "video": c["mp4"],
             "json": {"caption": c["caption"], "qa": c["qa"], "meta": c["meta"]}} for c in clips]


def write_published_formats(splits: dict, root) -> dict:
    """Clips in the published video-text file formats, as x2vlm.data.formats.video reads them, under `root`:

    - videos/<key>.mp4: every clip's mp4 bytes, written once and shared by both tasks;
    - retrieval_<split>.json (MSRVTT): a JSON list of {"video_id", "caption"}; the "train" split has an entry per
      caption, the others one caption per video (as the 1k-A test file);
    - qa_<split>.jsonl for "train" and qa_<split>.json (a JSON list) for the others (MSRVTT-QA / MSVD-QA):
      {"video_id", "question", "answer", "type"}.

    `splits`: {split name: clips}. Returns {"videos": folder, "retrieval": {split: file}, "qa": {split: file}}."""
    root = Path(root)
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    out = {"videos": str(videos), "retrieval": {}, "qa": {}}
    for split, clips in splits.items():
        for c in clips:
            (videos / f"{c['key']}.mp4").write_bytes(c["mp4"])
        retrieval = [{"video_id": c["key"], "caption": c["caption"]} for c in clips]
        qa = [{"video_id": c["key"], "question": q["question"], "answer": q["answer"], "type": q["type"]}
              for c in clips for q in c["qa"]]
        out["retrieval"][split] = str(root / f"retrieval_{split}.json")
        Path(out["retrieval"][split]).write_text(json.dumps(retrieval, indent=0) + "\n", encoding="utf-8")
        if split == "train":
            out["qa"][split] = str(root / f"qa_{split}.jsonl")
            text = "".join(json.dumps(row) + "\n" for row in qa)
        else:
            out["qa"][split] = str(root / f"qa_{split}.json")
            text = json.dumps(qa, indent=0) + "\n"
        Path(out["qa"][split]).write_text(text, encoding="utf-8")
    return out
