"""Video QA evaluation: classification over the answer vocabulary on the fusion [CLS]; accuracy overall and per
question type. A question whose answer is outside the vocabulary (label -1) counts as wrong, never dropped.

Chance is the accuracy of a blind answerer that knows the question type: each question answered with the most
frequent answer of its type among the evaluated questions. Chosen on the evaluated questions themselves, it is
an upper bound on any answerer that ignores the video (uniform guessing, the most frequent training answer) and
so a conservative baseline."""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import islice

import torch

from x2vlm.data.pipeline import pad_clips
from x2vlm.data.transforms import frames_to_tensor
from x2vlm.eval.ranking import model_device
from x2vlm.logs import progress


def _batches(samples, size: int):
    it = iter(samples)
    while chunk := list(islice(it, size)):
        yield chunk


@torch.no_grad()
def evaluate_videoqa(model, samples, tokenize, image_size: int, batch: int = 16, examples: int = 0) -> dict:
    """`samples`: decoded clips {"frames", "json": {"qa": [{"question", "label", "type"}]}} (e.g. from
    x2vlm.eval.run.clips), evaluated `batch` clips at a time with all their questions. Returns
    {"acc", "n", "clips", "chance", "majority" (always the most frequent answer), "outside_vocab",
    "by_type": {type: {"acc", "n", "chance", ...}}}; with `examples` = n also the first n right and the first n
    wrong answers ("examples": clip index, question, type, label, predicted label, right)."""
    model.eval()
    device = model_device(model)
    rows, clips, shown = [], 0, {True: [], False: []}  # (hit, type, label) per question
    for chunk in progress(_batches(samples, batch), desc="video QA", unit=" batches"):
        videos, frame_mask = pad_clips([frames_to_tensor(s["frames"], image_size) for s in chunk])
        qa = [(i, q) for i, s in enumerate(chunk) for q in s["json"]["qa"]]
        ids, atts = tokenize([q["question"] for _, q in qa])
        vis = model.encode_video(videos.to(device), frame_mask.to(device))  # [B, 1 + P, Dv]
        index = torch.tensor([i for i, _ in qa], device=device)
        pred = model.answer_logits(vis, ids.to(device), atts.to(device), index).argmax(-1).tolist()
        for (i, q), p in zip(qa, pred):
            hit = q["label"] >= 0 and p == q["label"]
            rows.append((hit, q.get("type") or "", q["label"]))
            if len(shown[hit]) < examples:
                shown[hit].append({"clip": clips + i, "question": q["question"], "type": q.get("type") or "",
                                   "label": q["label"], "pred": p, "right": hit})
        clips += len(chunk)
    if not rows:
        return {"n": 0}
    out = {**accuracy(rows), "clips": clips, "by_type": {t: accuracy([r for r in rows if r[1] == t])
                                                         for t in sorted({r[1] for r in rows}) if t}}
    return {**out, "examples": shown[True] + shown[False]} if examples else out


def accuracy(rows: list) -> dict:
    """{"acc", "n", "chance", "majority", "outside_vocab"} of (hit, type, label) rows; see the module docstring for
    chance. Out-of-vocabulary answers (label -1) are never a blind answer."""
    n = len(rows)
    by_type = defaultdict(Counter)
    for _, t, label in rows:
        if label >= 0:
            by_type[t][label] += 1
    overall = Counter(label for _, _, label in rows if label >= 0)
    return {"acc": sum(h for h, _, _ in rows) / n, "n": n,
            "chance": sum(c.most_common(1)[0][1] for c in by_type.values()) / n,
            "majority": overall.most_common(1)[0][1] / n if overall else 0.0,
            "outside_vocab": sum(label < 0 for _, _, label in rows)}
