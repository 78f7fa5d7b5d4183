"""Video question answering: classification over the answer vocabulary on the fusion [CLS] of each question with
its clip. Labels of -1 (an answer outside the vocabulary) are left out of the loss."""
from __future__ import annotations

import torch.nn.functional as F

from x2vlm.objectives.base import every_parameter, visual_tokens

USED = {"vision", "temporal", "text", "fusion", "qa_head"}


class VideoQA:
    def __call__(self, model, batch: dict) -> dict:
        """"qa" (cross-entropy), "loss" (the same) and the detached statistic "qa_acc"."""
        vis = visual_tokens(model, batch)  # [N, 1 + P, Dv]
        logits = model.answer_logits(vis, batch["text_ids"], batch["text_atts"], batch["image_idx"])  # [M, A]
        labels = batch["answer_labels"]
        known = labels >= 0
        loss = F.cross_entropy(logits, labels, ignore_index=-1) if known.any() else logits.sum() * 0.0
        acc = (logits.argmax(-1) == labels).float().mean().detach()
        return {"qa": loss, "loss": every_parameter(loss, model, USED), "qa_acc": acc}
