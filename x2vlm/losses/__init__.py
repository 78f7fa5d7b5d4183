"""Loss functions: matching (ITM) with hard negatives, masked LM, box L1 + GIoU. The contrastive loss (ITC) is a
fused op: x2vlm.ops.contrastive_loss, its plain definition x2vlm.ops.itc_loss."""
from x2vlm.losses.box import box_losses
from x2vlm.losses.itm import itm_labels, itm_loss
from x2vlm.losses.mlm import mlm_loss

__all__ = ["box_losses", "itm_labels", "itm_loss", "mlm_loss"]
