"""X2-VLM's pre-training objective for image, region and video batches (also video retrieval fine-tuning, where
"instance_ids" make all texts of one video positives):

    ITC  region CLS vs text [CLS], features gathered across ranks, one hard negative per row drawn in the same pass
    ITM  fusion [CLS] of (text, its visual sequence) against those hard negatives
    MLM  fusion of the masked text with its visual sequence
    box  fusion [CLS] of (region text, the whole image, no mask) -> normalised (cx, cy, w, h); L1 + GIoU

Loss math runs in float32 also when the model is in bf16.
"""
from __future__ import annotations

import functools

import torch

from x2vlm.boxes import xywh_to_cxcywh
from x2vlm.config import LossConfig
from x2vlm.losses import box_losses, itm_labels, itm_loss, mlm_loss
from x2vlm.objectives.base import every_parameter, visual_tokens
from x2vlm.ops import contrastive_loss

ALWAYS_USED = {"vision", "text", "fusion", "vision_proj", "text_proj", "temperature", "itm_head", "mlm_head"}


@functools.lru_cache(maxsize=16)
def _hash_weights(length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(1, 2 ** 62, (length,), generator=torch.Generator().manual_seed(20240601)).to(device)


def text_keys(ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
    """[M] int64: the same number for the same token sequence, on every rank (a fixed-weight hash of the ids)."""
    return ((ids * atts).long() * _hash_weights(ids.shape[1], ids.device)).sum(1)  # (wraps in int64: still a hash)


class Pretraining:
    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(self, model, batch: dict) -> dict:
        """Scalar losses "itc", "itm", "mlm" (+ "bbox", "giou" when the batch has region texts), their weighted
        sum "loss", and the detached statistic "itm_acc"."""
        ids, atts, image_idx = batch["text_ids"], batch["text_atts"], batch["image_idx"]  # [M, L], [M, L], [M]
        instance_ids = batch.get("instance_ids")
        vis = visual_tokens(model, batch)  # [N, 1 + P, Dv]: each unique image (or clip) once
        cls, vis_mask = model.regions(vis, batch["boxes"], image_idx)  # [M, Dv], [M, 1 + P]
        txt = model.encode_text(ids, atts)  # [M, L, Dt]

        # ITC, and one hard negative per row in each direction drawn in the same pass. Pairs whose texts are the
        # same words are positives of each other (in a batch of short phrases "the red circle" is often the text of
        # regions of several images), unless instance ids are given (then they decide). Never a negative: the
        # same image (a phrase still matches its own image's sequences) or instance, nor the same words.
        keys = text_keys(ids, atts)
        same = image_idx if instance_ids is None else instance_ids
        con = contrastive_loss(model.vision_proj(cls), model.text_feat(txt), model.temperature(),
                               keys if instance_ids is None else instance_ids,
                               exclude_ids=torch.stack([same, keys], 1), impl=self.cfg.itc_impl)

        # ITM: all 3M pairs (positives, text + negative visual, negative text + visual) through the fusion encoder
        # together, each image's keys/values computed once.
        own = torch.arange(len(ids), device=ids.device)
        visual = torch.cat([own, con.neg_image, own])  # [3M]: the visual side of each ITM pair, as a text index
        itm_out = model.itm_logits(torch.cat([txt, txt, txt[con.neg_text]]),
                                   torch.cat([atts, atts, atts[con.neg_text]]),
                                   vis, vis_mask[visual], image_idx[visual], cls[visual])  # [3M, 2]
        labels = itm_labels(con.neg_image_valid, con.neg_text_valid)
        itm = itm_loss(itm_out, labels)

        # MLM: the masked text fused with its visual sequence; the head runs at masked positions only.
        fused = model.fuse(model.encode_text(batch["mlm_ids"], atts), atts, vis, vis_mask, image_idx, cls)
        mlm_labels = batch["mlm_labels"]
        masked = mlm_labels != -100
        mlm = mlm_loss(model.mlm_head(fused[masked]), mlm_labels[masked])

        w = self.cfg
        out = {"itc": con.loss, "itm": itm, "mlm": mlm}
        loss = w.itc * con.loss + w.itm * itm + w.mlm * mlm
        used = set(ALWAYS_USED)
        region = batch["is_region"]
        if region.any():  # box: region texts with the whole image
            pred = model.boxes_of(txt[region], atts[region], vis, index=image_idx[region])
            target = xywh_to_cxcywh(batch["boxes"][region].float()) / model.cfg.vision.image_size
            out["bbox"], out["giou"] = box_losses(pred, target)
            loss = loss + w.bbox * out["bbox"] + w.giou * out["giou"]
            used.add("bbox_head")
        if "videos" in batch:
            used.add("temporal")
        out["loss"] = every_parameter(loss, model, used)
        with torch.no_grad():
            scored = labels != -100
            out["itm_acc"] = (itm_out.argmax(-1) == labels)[scored].float().mean()
        return out
