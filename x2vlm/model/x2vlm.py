"""The X2-VLM model, top to bottom.

    images -> vision encoder -> [mean token, patches]          once per unique image   [N, 1 + P, Dv]
    videos -> every frame through the vision encoder, + frame embedding, temporal aggregation -> the same shape
    texts  -> text encoder   -> tokens                                                  [M, L, Dt]
    per text (gathered by image_idx): its image's tokens with token 0 replaced by the mean of the patches in its
    box (the region CLS), and a cross-attention mask hiding the patches outside the box  [M, 1 + P, Dv]

    ITC  region CLS vs text [CLS], features gathered across ranks
    ITM  fusion [CLS] of (text, its visual sequence) against hard negatives drawn from the ITC logits
    MLM  fusion of the masked text with its visual sequence
    box  fusion [CLS] of (region text, the whole image, no mask) -> normalised (cx, cy, w, h); L1 + GIoU

Loss math runs in float32 also when DeepSpeed has cast the module to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import LossConfig, ModelConfig
from x2vlm.losses import box_losses, itm_labels, itm_loss, mlm_loss
from x2vlm.model.fusion import FusionEncoder
from x2vlm.model.heads import BoxHead, MLMHead, MLPHead, Projection, Temperature
from x2vlm.model.regions import patch_mask, xywh_to_cxcywh_norm
from x2vlm.model.temporal import TemporalAggregator
from x2vlm.model.text import TextEncoder
from x2vlm.model.vision import VisionEncoder
from x2vlm.ops import box_pool, contrastive_loss, grid_boxes

BACKBONES = ("vision.", "text.")  # loaded from pre-trained weights; everything else starts fresh


def init_fresh(module: nn.Module) -> None:
    """BERT's initialisation for the fresh parts: weights N(0, 0.02), zero biases, unit LayerNorms. The heads
    then start near their neutral outputs (ITM logits about 0, boxes about the image centre)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class X2VLM(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.cfg, self.loss_cfg = model_cfg, loss_cfg
        self.vision = VisionEncoder(model_cfg.vision)
        self.text = TextEncoder(model_cfg.text, vocab_size, pad_id)
        dv, dt = self.vision.width, self.text.width
        grid = model_cfg.vision.image_size // model_cfg.vision.patch_size
        self.fusion = FusionEncoder(model_cfg.fusion, width=dt, vision_width=dv, grid=grid)
        self.vision_proj = Projection(dv, model_cfg.embed_dim)
        self.text_proj = Projection(dt, model_cfg.embed_dim)
        self.temperature = Temperature(model_cfg.temp, model_cfg.temp_min, model_cfg.temp_max)
        self.itm_head = MLPHead(dt, 2)
        self.bbox_head = BoxHead(dt)
        self.mlm_head = MLMHead(dt, self.text.vocab_size)
        self.temporal = TemporalAggregator(model_cfg.video, dv)  # initialises itself (see temporal.py)
        self.qa_head = MLPHead(dt, model_cfg.qa_answers) if model_cfg.qa_answers else None
        if self.qa_head is not None:
            self.qa_head.apply(init_fresh)
        for fresh in (self.fusion, self.vision_proj, self.text_proj, self.itm_head, self.bbox_head, self.mlm_head):
            fresh.apply(init_fresh)
        self.vision.requires_grad_(not model_cfg.vision.frozen)

    # --- parameter groups ----------------------------------------------------------------------------------
    @staticmethod
    def is_new_param(name: str) -> bool:
        """True for freshly initialised parameters (fusion with its cross-attention, projections, temperature,
        ITM / box / MLM heads), False for the backbones (vision and text encoders). Accepts names with the
        "module." prefix of a wrapping engine."""
        return not name.removeprefix("module.").startswith(BACKBONES)

    def new_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if self.is_new_param(name)]

    # --- encoders and heads --------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> [N, 1 + P, Dv]: mean patch token, then the patch tokens."""
        return self.vision(images)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames [B, F, 3, H, W], frame_mask [B, F] bool (None = all real) -> [B, 1 + P, Dv], shaped like one
        image: all B * F frames through the image encoder as one batch, then the temporal aggregator."""
        b, f = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(b, f, dtype=torch.bool, device=frames.device)
        tokens = self.encode_image(frames.flatten(0, 1))
        return self.temporal(tokens.view(b, f, *tokens.shape[1:]), frame_mask)

    def encode_visual(self, batch: dict) -> torch.Tensor:
        """Vision tokens of a batch's images ("images" [N, 3, H, W]) or clips ("videos" [N, F, 3, H, W] with
        "frame_mask" [N, F])."""
        if "videos" in batch:
            return self.encode_video(batch["videos"], batch.get("frame_mask"))
        return self.encode_image(batch["images"])

    def encode_text(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """ids, atts [M, L] -> [M, L, Dt]."""
        return self.text(ids, atts)

    def image_feat(self, vis_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised contrastive feature [.., E] (float32) from visual token 0 (image mean or region CLS)."""
        return self.vision_proj(vis_tokens[..., 0, :])

    def text_feat(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised contrastive feature [.., E] (float32) from the [CLS] token."""
        return self.text_proj(text_tokens[..., 0, :])

    def fuse(self, text_tokens: torch.Tensor, text_atts: torch.Tensor, vis_tokens: torch.Tensor,
             vis_mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
             first: torch.Tensor | None = None) -> torch.Tensor:
        """Text tokens [M, L, Dt] attending to vision tokens. `vis_tokens` [N, V, Dv] holds each image once and
        `index` [M] names each text's image (None: N = M, or N = 1 shared by all texts); vis_mask [M, V] bool
        (None = all); `first` [M, Dv] replaces vision token 0 per text (a region token)."""
        m = text_tokens.shape[0]
        if index is None and vis_tokens.shape[0] != m:
            index = torch.zeros(m, dtype=torch.long, device=vis_tokens.device)
        if vis_mask is None:
            vis_mask = torch.ones(m, vis_tokens.shape[1], dtype=torch.bool, device=vis_tokens.device)
        return self.fusion(text_tokens, text_atts, vis_tokens, vis_mask, index, first)

    def itm_logits(self, text_tokens: torch.Tensor, text_atts: torch.Tensor, vis_tokens: torch.Tensor,
                   vis_mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
                   first: torch.Tensor | None = None) -> torch.Tensor:
        """Match / no-match logits [M, 2] (float32; index 1 = match) from the fusion [CLS]; arguments as fuse."""
        return self.itm_head(self.fuse(text_tokens, text_atts, vis_tokens, vis_mask, index, first)[:, 0]).float()

    def predict_boxes(self, visual: torch.Tensor, ids: torch.Tensor, atts: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (cx, cy, w, h) [M, 4] for each text, from the fusion [CLS] with the whole image (no mask).
        `visual`: images [N, 3, H, W] or vision tokens [N, 1 + P, Dv]; `index` [M] names each text's image
        (None: N = M, or one image for all texts)."""
        vis = self.encode_image(visual) if visual.dim() == 4 else visual
        return self.bbox_head(self.fuse(self.encode_text(ids, atts), atts, vis, index=index)[:, 0])

    # --- pre-training / fine-tuning losses -----------------------------------------------------------------
    def qa_logits(self, batch: dict) -> torch.Tensor:
        """Answer logits [M, answers] (float32) from the fusion [CLS] of each question with its clip (or image)."""
        vis = self.encode_visual(batch)
        atts = batch["text_atts"]
        fused = self.fuse(self.encode_text(batch["text_ids"], atts), atts, vis, index=batch["image_idx"])
        return self.qa_head(fused[:, 0]).float()

    def forward(self, batch: dict) -> dict:
        """Scalar losses "itc", "itm", "mlm" (+ "bbox", "giou" when the batch has region texts), their weighted
        sum "loss", and the detached statistic "itm_acc". See the module docstring for the data flow."""
        if "answer_labels" in batch:  # video QA: classification over the answer vocabulary
            if self.qa_head is None:
                raise ValueError("a video_qa batch needs model.qa_answers > 0 (the answer vocabulary size)")
            logits, labels = self.qa_logits(batch), batch["answer_labels"]
            known = labels >= 0
            loss = F.cross_entropy(logits, labels, ignore_index=-1) if known.any() else logits.sum() * 0.0
            acc = (logits.argmax(-1) == labels).float().mean().detach()
            return {"qa": loss, "loss": loss, "qa_acc": acc}
        size, patch = self.cfg.vision.image_size, self.cfg.vision.patch_size
        ids, atts, image_idx = batch["text_ids"], batch["text_atts"], batch["image_idx"]
        instance_ids = batch.get("instance_ids")

        vis = self.encode_visual(batch)  # each unique image (or clip) once
        grid = size // patch
        gbox = grid_boxes(batch["boxes"], size, patch)
        vis_mask = patch_mask(gbox, grid)  # [M, 1 + P]
        cls = box_pool(vis[:, 1:], gbox, image_idx, grid, self.cfg.box_pool_impl)  # mean of the box's patches
        txt = self.encode_text(ids, atts)

        # ITC, and one hard negative per row in each direction drawn in the same pass. Never a negative: texts
        # of the same image (a phrase still matches its own image's sequences), or of the same instance when
        # instance ids are given (then they decide alone).
        exclude = image_idx if instance_ids is None else instance_ids
        con = contrastive_loss(self.vision_proj(cls), self.text_feat(txt), self.temperature(), instance_ids,
                               exclude_ids=exclude, impl=self.loss_cfg.itc_impl)
        itc = con.loss
        neg_img, neg_img_ok, neg_txt, neg_txt_ok = con.neg_image, con.neg_image_valid, con.neg_text, con.neg_text_valid

        # ITM: all 3M pairs (positives, text + negative visual, negative text + visual) through the fusion encoder
        # together, each image's keys/values computed once.
        own = torch.arange(len(ids), device=ids.device)
        visual = torch.cat([own, neg_img, own])  # the visual side of each ITM pair, as a text index
        itm_out = self.itm_logits(torch.cat([txt, txt, txt[neg_txt]]), torch.cat([atts, atts, atts[neg_txt]]),
                                  vis, vis_mask[visual], image_idx[visual], cls[visual])
        labels = itm_labels(neg_img_ok, neg_txt_ok)
        itm = itm_loss(itm_out, labels)

        # MLM: the masked text fused with its visual sequence; the head runs at masked positions only.
        fused = self.fuse(self.encode_text(batch["mlm_ids"], atts), atts, vis, vis_mask, image_idx, cls)
        mlm_labels = batch["mlm_labels"]
        masked = mlm_labels != -100
        mlm = mlm_loss(self.mlm_head(fused[masked]), mlm_labels[masked])

        # Box: region texts with the whole image. Runs also with no region text (on zero rows), so that every
        # parameter takes part in every step on every rank, as ZeRO-3 expects.
        region = batch["is_region"]
        pred = self.bbox_head(self.fuse(txt[region], atts[region], vis, index=image_idx[region])[:, 0])
        bbox, giou = box_losses(pred, xywh_to_cxcywh_norm(batch["boxes"][region], size))

        w = self.loss_cfg
        out = {"itc": itc, "itm": itm, "mlm": mlm}
        if region.any():
            out.update(bbox=bbox, giou=giou)
        out["loss"] = w.itc * itc + w.itm * itm + w.mlm * mlm + w.bbox * bbox + w.giou * giou
        if "videos" not in batch:  # the temporal parameters take part (with zero gradient), as ZeRO-3 expects
            out["loss"] = out["loss"] + sum(p.sum() for p in self.temporal.parameters()) * 0.0
        with torch.no_grad():
            scored = labels != -100
            out["itm_acc"] = (itm_out.argmax(-1) == labels)[scored].float().mean()
        return out
