"""Fusion encoder in X2-VLM's own form (`model.fusion.style: bert`): post-LN BERT layers with cross-attention.

X2-VLM keeps its fusion layers as layers 12-17 of its BERT text encoder; each is a BERT layer (self-attention,
cross-attention into the vision tokens, feed-forward), every sub-block added to its input and then normalised
(post-LN). Parameter names are Hugging Face BERT's, so the published `text_encoder.encoder.layer.{12+i}.*`
tensors load here as `layer.{i}.*` unchanged.

Self-attention is bidirectional over the text (padding masked out), as in X2-VLM. Hugging Face's BertLayer cannot
be used as it is: with `add_cross_attention` it insists on `is_decoder=True`, which makes its self-attention
causal. Cross-attention takes the `fuse` interface of the project's own fusion encoder: `vis` holds each image
once, `index` names each text's image (keys and values computed once per image), `first` replaces vision token 0
per text (a region token). Attention is torch's scaled_dot_product_attention with boolean masks (True = may be
attended to).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import FusionConfig
from x2vlm.model.fusion import run_layers

LN_EPS = 1e-12  # BERT's LayerNorm epsilon


class Projections(nn.Module):
    """query from the text width, key and value from the width of what is attended to (BERT's `self` block)."""

    def __init__(self, width: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)


class Output(nn.Module):
    """dense, dropout, add the block's input, LayerNorm (BERT's post-LN output block)."""

    def __init__(self, width_in: int, width: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    """Multi-head attention of x [M, L, D] over keys/values from `kv` [N, V, Dkv] with a key mask [M, V], then
    BERT's output block. Self-attention: kv = x. Cross-attention: see the module docstring for index / first."""

    def __init__(self, width: int, kv_width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.self = Projections(width, kv_width)
        self.output = Output(width, width, dropout)

    def keys_values(self, kv: torch.Tensor, index: torch.Tensor | None, first: torch.Tensor | None):
        p = self.self
        k, v = p.key(kv), p.value(kv)  # [N, V, D]: once per image
        if index is not None:
            k, v = k[index], v[index]  # [M, V, D]
        if first is not None:  # token 0 of each text's sequence is its region token
            k = torch.cat([p.key(first)[:, None], k[:, 1:]], 1)
            v = torch.cat([p.value(first)[:, None], v[:, 1:]], 1)
        return k, v

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        m, n, d = x.shape
        return x.view(m, n, self.heads, d // self.heads).transpose(1, 2)  # [M, H, N, D / H]

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor, index: torch.Tensor | None = None,
                first: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.keys_values(kv, index, first)  # [M, V, D] each
        q, k, v = self.split_heads(self.self.query(x)), self.split_heads(k), self.split_heads(v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)  # [M, H, L, D / H]
        m, h, n, d = y.shape
        return self.output(y.transpose(1, 2).reshape(m, n, h * d), x)  # [M, L, D]


class Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BERT's exact (erf) GELU


class BertFusionLayer(nn.Module):
    def __init__(self, width: int, vision_width: int, cfg: FusionConfig):
        super().__init__()
        self.attention = BertAttention(width, width, cfg.heads, cfg.dropout)
        self.crossattention = BertAttention(width, vision_width, cfg.heads, cfg.dropout)
        self.intermediate = Intermediate(width, cfg.intermediate_size)
        self.output = Output(cfg.intermediate_size, width, cfg.dropout)

    def forward(self, x, text_mask, vis, vis_mask, index=None, first=None):
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, vis, vis_mask, index, first)
        return self.output(self.intermediate(x), x)


class BertFusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, width: int, vision_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertFusionLayer(width, vision_width, cfg) for _ in range(cfg.layers))
        self.checkpointing = False  # activation checkpointing of every layer (see ModelConfig)

    def forward(self, text: torch.Tensor, text_atts: torch.Tensor, vis: torch.Tensor, vis_mask: torch.Tensor,
                index: torch.Tensor | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
        """text [M, L, Dt], text_atts [M, L] (1 = token, 0 = padding), vis [N, V, Dv] with index [M] (text ->
        row of vis; None: N = M, row i for text i), vis_mask [M, V] bool, first [M, Dv] or None (replaces
        vision token 0 per text) -> [M, L, Dt]."""
        return run_layers(self.layer, text, self.checkpointing, text_atts.bool(), vis, vis_mask, index, first)

    @torch.no_grad()
    def init_from_text(self, text_encoder: nn.Module) -> int:
        """Start the self-attention and feed-forward blocks from the last len(self.layer) layers of a BERT-named
        text encoder (X2-VLM initialises its fusion layers 12-17 from BERT's layers 6-11); cross-attention keeps
        its fresh initialisation. Returns the number of tensors copied."""
        layers = getattr(getattr(text_encoder, "encoder", None), "layer", None)
        if layers is None or len(layers) < len(self.layer):
            return 0
        copied = 0
        for own, src in zip(self.layer, list(layers)[-len(self.layer):]):
            theirs = src.state_dict()
            for name, tensor in own.state_dict().items():
                if not name.startswith("crossattention.") and name in theirs \
                        and theirs[name].shape == tensor.shape:
                    tensor.copy_(theirs[name])
                    copied += 1
        return copied
