"""Losses: contrastive (ITC) across ranks, matching (ITM) with hard negatives, masked LM, box L1 + GIoU."""
from x2vlm.losses.box import box_losses, cxcywh_to_xyxy, giou
from x2vlm.losses.itc import gather_rows, itc_loss
from x2vlm.losses.itm import itm_labels, itm_loss
from x2vlm.losses.mlm import mlm_loss

__all__ = ["box_losses", "cxcywh_to_xyxy", "giou", "gather_rows", "itc_loss", "itm_labels", "itm_loss",
           "mlm_loss"]
