"""The X2-VLM model, top to bottom. It encodes, fuses and applies heads; what to learn from a batch is an
objective's business (x2vlm.objectives), which `forward` runs on the model.

    images -> vision encoder -> [mean token, patches]          once per unique image   [N, 1 + P, Dv]
    videos -> every frame through the vision encoder, + frame embedding, temporal aggregation -> the same shape
    texts  -> text encoder   -> tokens                                                  [M, L, Dt]
    region -> the mean of the patches in a box (the region CLS, replacing token 0 for its text) and a
              cross-attention mask hiding the patches outside the box                   [M, Dv], [M, 1 + P]
    fusion -> text tokens attend to their visual sequence                               [M, L, Dt]
    heads  -> contrastive features (vision_proj / text_proj, temperature), ITM, box, MLM, QA

Heads that feed a loss return float32, also when DeepSpeed has cast the module to bf16.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from x2vlm.config import ModelConfig
from x2vlm.model.fusion import FusionEncoder
from x2vlm.model.fusion_bert import BertFusionEncoder
from x2vlm.model.heads import BoxHead, MLMHead, MLPHead, Projection, Temperature
from x2vlm.model.regions import patch_mask
from x2vlm.model.temporal import TemporalAggregator
from x2vlm.model.text import TextEncoder
from x2vlm.model.vision import VisionEncoder
from x2vlm.ops import box_pool, grid_boxes

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


def attention_kernels(dtype: torch.dtype, device: torch.device):
    """A context in which attention runs fastest: on CPUs in bf16, torch's flash-attention kernel (forward and
    above all backward) is several times slower than the plain softmax(QK^T)V at the short sequences of the vision
    and text towers, so the plain one is chosen there; elsewhere torch's own choice stands."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


class X2VLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.text = TextEncoder(cfg.text, vocab_size, pad_id)
        dv, dt = self.vision.width, self.text.width
        self.grid = cfg.vision.image_size // cfg.vision.patch_size
        if cfg.fusion.style == "bert":  # X2-VLM's own layers (post-LN BERT with cross-attention)
            self.fusion = BertFusionEncoder(cfg.fusion, width=dt, vision_width=dv)
        else:
            self.fusion = FusionEncoder(cfg.fusion, width=dt, vision_width=dv, grid=self.grid)
        self.vision_proj = Projection(dv, cfg.embed_dim)
        self.text_proj = Projection(dt, cfg.embed_dim)
        self.temperature = Temperature(cfg.temp, cfg.temp_min, cfg.temp_max)
        self.itm_head = MLPHead(dt, 2)
        self.bbox_head = BoxHead(dt)
        self.mlm_head = MLMHead(dt, self.text.vocab_size)
        self.temporal = TemporalAggregator(cfg.video, dv)  # initialises itself (see temporal.py)
        self.qa_head = MLPHead(dt, cfg.qa_answers) if cfg.qa_answers else None
        if self.qa_head is not None:
            self.qa_head.apply(init_fresh)
        for fresh in (self.fusion, self.vision_proj, self.text_proj, self.itm_head, self.bbox_head, self.mlm_head):
            fresh.apply(init_fresh)
        if cfg.fusion.style == "bert" and cfg.text.init_checkpoint:  # as X2-VLM: from the text encoder's top
            self.fusion.init_from_text(self.text.encoder)
        self.vision.requires_grad_(not cfg.vision.frozen)
        self.checkpoint_towers(cfg.activation_checkpointing)

    def forward(self, batch: dict, objective) -> dict:
        """`objective(model, batch)` -> its losses. The objective runs inside the module's forward so that a
        wrapping engine (DeepSpeed: ZeRO-3 parameter gathering, precision hooks) sees the whole computation."""
        weight = self.text_proj.proj.weight
        with attention_kernels(weight.dtype, weight.device):
            return objective(self, batch)

    def checkpoint_towers(self, towers) -> None:
        """Activation checkpointing for the named towers ("vision", "text", "fusion"): each layer keeps only its
        input for backward and runs again there (same numbers, random generators included)."""
        for tower in towers:
            if tower == "vision":
                self.vision.vit.set_grad_checkpointing(True)
            elif tower == "text":
                self.text.checkpoint_layers()
            elif tower == "fusion":
                self.fusion.checkpointing = True
            else:
                raise ValueError(f"activation checkpointing: no tower {tower!r} (expected vision, text, fusion)")

    def zero_through(self, names) -> torch.Tensor:
        """A scalar 0 computed by running each named part (a child module) on an empty input: every trainable
        parameter of those parts then takes part in the step with a zero gradient. Running the parts, rather than
        summing their parameters, is what DeepSpeed's ZeRO-3 needs: it gathers a part's parameters only when the
        part runs."""
        dv, dt = self.vision.width, self.text.width
        widths = {"vision_proj": dv, "text_proj": dt, "itm_head": dt, "bbox_head": dt, "mlm_head": dt, "qa_head": dt}
        total = None
        for name in names:
            part = getattr(self, name)
            params = [p for p in part.parameters() if p.requires_grad] if part is not None else []
            if not params:
                continue
            empty = dict(dtype=params[0].dtype, device=params[0].device)
            if name == "temperature":
                out = part()
            elif name == "temporal":
                out = part(torch.zeros(0, 1, 1 + self.grid ** 2, dv, **empty),
                           torch.zeros(0, 1, dtype=torch.bool, device=empty["device"]))
            elif name == "fusion":
                text = torch.zeros(0, 1, dt, **empty)
                out = self.fuse(text, torch.ones(0, 1, dtype=torch.long, device=empty["device"]),
                                torch.zeros(0, 1 + self.grid ** 2, dv, **empty))
            elif name in widths:
                out = part(torch.zeros(0, widths[name], **empty))
            else:
                raise ValueError(f"no empty input for the model part {name!r}")
            total = out.float().sum() * 0.0 if total is None else total + out.float().sum() * 0.0
        return total if total is not None else torch.zeros(())

    # --- parameter groups ----------------------------------------------------------------------------------
    @staticmethod
    def is_new_param(name: str) -> bool:
        """True for freshly initialised parameters (fusion with its cross-attention, projections, temperature,
        ITM / box / MLM / QA heads, temporal aggregator), False for the backbones (vision and text encoders).
        Accepts names with the "module." prefix of a wrapping engine."""
        return not name.removeprefix("module.").startswith(BACKBONES)

    def new_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if self.is_new_param(name)]

    # --- encoders ------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> [N, 1 + P, Dv]: mean patch token, then the patch tokens."""
        return self.vision(images)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames [B, F, 3, H, W], frame_mask [B, F] bool (None = all real) -> [B, 1 + P, Dv], shaped like one
        image: all B * F frames through the image encoder as one batch, then the temporal aggregator."""
        b, f = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(b, f, dtype=torch.bool, device=frames.device)
        tokens = self.encode_image(frames.flatten(0, 1))  # [B * F, 1 + P, Dv]
        return self.temporal(tokens.view(b, f, *tokens.shape[1:]), frame_mask)

    def encode_text(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """ids, atts [M, L] -> [M, L, Dt]."""
        return self.text(ids, atts)

    def regions(self, vis: torch.Tensor, boxes: torch.Tensor, image_idx: torch.Tensor):
        """Each text's region of its image: boxes [M, 4] pixel (x, y, w, h) on image image_idx [M] of vis
        [N, 1 + P, Dv] -> (region CLS [M, Dv]: the mean of the box's patches; cross-attention mask [M, 1 + P]
        bool: token 0 and the patches inside the box). A box over the whole grid takes the image's own token 0
        (for an image the same mean of its patches; for a clip its clip token, which alone carries the motion
        summary), as held-out retrieval reads it."""
        gbox = grid_boxes(boxes, self.cfg.vision.image_size, self.cfg.vision.patch_size)
        cls = box_pool(vis[:, 1:], gbox, image_idx, self.grid, self.cfg.box_pool_impl)
        whole = (gbox[:, :2] == 0).all(1) & (gbox[:, 2:] == self.grid).all(1)  # [M]
        cls = torch.where(whole[:, None], vis[image_idx, 0], cls)
        return cls, patch_mask(gbox, self.grid)

    # --- heads ---------------------------------------------------------------------------------------------
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

    def boxes_of(self, text_tokens: torch.Tensor, text_atts: torch.Tensor, vis_tokens: torch.Tensor,
                        index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (cx, cy, w, h) [M, 4] for each text from its encoded tokens and the whole image (no mask)."""
        return self.bbox_head(self.fuse(text_tokens, text_atts, vis_tokens, index=index)[:, 0])

    def predict_boxes(self, visual: torch.Tensor, ids: torch.Tensor, atts: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (cx, cy, w, h) [M, 4] for each text, from the fusion [CLS] with the whole image (no mask).
        `visual`: images [N, 3, H, W] or vision tokens [N, 1 + P, Dv]; `index` [M] names each text's image
        (None: N = M, or one image for all texts)."""
        vis = self.encode_image(visual) if visual.dim() == 4 else visual
        return self.boxes_of(self.encode_text(ids, atts), atts, vis, index)

    def answer_logits(self, vis_tokens: torch.Tensor, ids: torch.Tensor, atts: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits [M, answers] (float32) from the fusion [CLS] of each question [M, L] with its clip or
        image (vis_tokens [N, 1 + P, Dv], index [M] as in fuse)."""
        if self.qa_head is None:
            raise ValueError("answering needs model.qa_answers > 0 (the answer vocabulary size)")
        return self.qa_head(self.fuse(self.encode_text(ids, atts), atts, vis_tokens, index=index)[:, 0]).float()
