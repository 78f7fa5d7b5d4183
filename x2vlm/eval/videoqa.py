"""Video QA evaluation: classification over the answer vocabulary on the fusion [CLS]; accuracy overall and per
question type. A question whose answer is outside the vocabulary (label -1) counts as wrong, never dropped."""
from __future__ import annotations

from collections import Counter, defaultdict

import torch


@torch.no_grad()
def evaluate_videoqa(model, samples, tokenize, image_size: int) -> dict:
    """`samples`: decoded clips {"frames", "json": {"qa": [{"question", "label", "type"}]}} (e.g. from
    video.shards.iterate_video_samples). Returns {"acc", "n", "chance", "majority", "outside_vocab",
    "by_type": {type: {"acc", "n"}}}."""
    from x2vlm.data.pipeline import frames_to_tensor

    model.eval()
    hits, types, labels = [], [], []
    for s in samples:
        qa = s["json"]["qa"]
        ids, atts = tokenize([q["question"] for q in qa])
        batch = {"videos": frames_to_tensor(s["frames"], image_size)[None], "text_ids": ids, "text_atts": atts,
                 "image_idx": torch.zeros(len(qa), dtype=torch.long)}
        pred = model.qa_logits(batch).argmax(-1).tolist()
        for q, p in zip(qa, pred):
            hits.append(q["label"] >= 0 and p == q["label"])
            types.append(q.get("type") or "")
            labels.append(q["label"])
    if not hits:
        return {"n": 0}
    by_type = defaultdict(list)
    for h, t in zip(hits, types):
        by_type[t].append(h)
    common = Counter(x for x in labels if x >= 0).most_common(1)
    return {"acc": sum(hits) / len(hits), "n": len(hits), "chance": 1.0 / model.cfg.qa_answers,
            "majority": (common[0][1] / len(hits)) if common else 0.0,
            "outside_vocab": sum(x < 0 for x in labels),
            "by_type": {t: {"acc": sum(h) / len(h), "n": len(h)} for t, h in sorted(by_type.items()) if t}}
