"""Text encoder: any transformers encoder chosen by `model_type` (BERT by default; XLM-R works by configuration).

Built from a configuration (random weights), or from a local checkpoint directory with from_pretrained. The
pooler is removed: it is unused, and parameters that never get gradients trouble DeepSpeed ZeRO.
"""
from __future__ import annotations

import torch
from torch import nn

from x2vlm.config import TextConfig


def text_config(cfg: TextConfig, vocab_size: int, pad_id: int):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=cfg.vocab_size or vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size,
        # BERT's table size, so that published checkpoints fit; RoBERTa-style models number positions from
        # pad_id + 1, hence the margin.
        max_position_embeddings=max(512, cfg.max_len + pad_id + 1),
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad_id)
    return AutoConfig.for_model(cfg.model_type, **{**kwargs, **cfg.extra})


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, vocab_size: int, pad_id: int):
        super().__init__()
        from transformers import AutoModel

        if cfg.init_checkpoint:
            self.encoder = AutoModel.from_pretrained(
                cfg.init_checkpoint, local_files_only=True, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout, **cfg.extra)
        else:
            self.encoder = AutoModel.from_config(text_config(cfg, vocab_size, pad_id))
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        self.width = self.encoder.config.hidden_size
        self.vocab_size = self.encoder.get_input_embeddings().num_embeddings

    def checkpoint_layers(self) -> None:
        """Activation checkpointing of every layer (non-reentrant: works with ZeRO-3 and frozen inputs)."""
        self.encoder.config.use_cache = False  # (an encoder keeps no cache; says so to silence a warning)
        enable = getattr(self.encoder, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """ids, atts [M, L] -> last hidden state [M, L, D]."""
        return self.encoder(input_ids=ids, attention_mask=atts).last_hidden_state
