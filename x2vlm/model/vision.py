"""Vision encoder: a timm ViT or BEiT(-2) whose output is [mean patch token, patch tokens].

The ViT's own prefix tokens ([CLS], registers) take part in attention but are dropped from the output; the visual
"CLS" is the mean of the patch tokens after the final LayerNorm (`final_norm: tokens`, timm's `norm`, on every
token) or after a LayerNorm of the patch tokens alone (`final_norm: patches`, timm's `fc_norm`: BEiT-2's
mean-pooling head, as X2-VLM). Output [N, 1 + P, D].

Images come in normalised with mean = std = 0.5; an encoder trained with other pixel statistics (`pixels: clip`,
X2-VLM's) maps them to its own first, so every caller prepares images one way.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from x2vlm.config import ConfigError, VisionConfig


def load_state_file(path: str) -> dict:
    """A state dict from a .safetensors file or a torch file (tensors only: weights_only, no code runs)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def adapt_state_dict(state: dict, vit: nn.Module) -> dict:
    """Fit a published ViT / BEiT-2 state dict to `vit`:
    - BEiT(-2) pre-training checkpoints share one relative position bias table: copy it into every block;
    - a classifier checkpoint keeps the final norm as `fc_norm` (applied after pooling): here it is `norm`,
      applied to every token;
    - the classifier head is dropped (the encoder has none);
    - then timm's own filter for the model family resizes patch / position embeddings and relative position bias
      tables to this resolution."""
    own = dict(vit.named_parameters())
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    shared = state.pop("rel_pos_bias.relative_position_bias_table", None)
    state.pop("rel_pos_bias.relative_position_index", None)
    if shared is not None:
        for name in own:
            if name.endswith("attn.relative_position_bias_table"):
                state.setdefault(name, shared)
    if "norm.weight" in own and "fc_norm.weight" not in own and "norm.weight" not in state:
        for suffix in ("weight", "bias"):
            if f"fc_norm.{suffix}" in state:
                state[f"norm.{suffix}"] = state.pop(f"fc_norm.{suffix}")
    filter_fn = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
    return filter_fn(state, vit) if filter_fn is not None else state


PIXEL_STATS = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
INPUT_MEAN = INPUT_STD = 0.5  # what x2vlm.data.transforms normalises with


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table [grid * grid, dim], row-major: half the channels encode the row,
    half the column (as MAE initialises ViTs trained from scratch)."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(rows.flatten(), dim // 2), one_axis(cols.flatten(), dim // 2)], dim=1).float()


class ConvStem(nn.Module):
    """A convolutional stem in place of a ViT's linear patch embedding (`model.vision.stem: conv`): log2(patch)
    3x3 convolutions of stride 2, each followed by a GroupNorm over the whole feature map (one group: per image,
    no batch statistics) and GELU, with the channels doubling up to the token width, then a 1x1 convolution to
    the tokens. The same tokens [N, P, D] on the same patch grid as the patch embedding, but built from
    overlapping local features: a ViT trained from scratch learns the shapes of objects many times faster with it
    (as reported for early convolutions in ViTs; docs/experiments.md has the measurement). It takes the keyword
    arguments timm's ViT gives its `embed_layer`."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 **_timm_options):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, channels = [], in_chans
        for width in self.widths(patch_size, embed_dim):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, width),
                       nn.GELU()]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    @staticmethod
    def widths(patch_size: int, embed_dim: int) -> list[int]:
        """Output channels of each stride-2 convolution (log2(patch_size) of them)."""
        n = patch_size.bit_length() - 1
        return [max(8, embed_dim >> (n - 1 - i)) for i in range(n)]

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, P, D], patches row by row


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import timm

        # global_pool="" keeps the final LayerNorm on the tokens; "avg" makes it `fc_norm`, which timm applies after
        # pooling and this encoder to each patch token (final_norm: patches).
        kwargs = dict(pretrained=False, img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                      depth=cfg.depth, num_heads=cfg.heads, drop_path_rate=cfg.drop_path, num_classes=0,
                      global_pool="avg" if cfg.final_norm == "patches" else "")
        if cfg.stem == "conv":
            kwargs["embed_layer"] = ConvStem
        try:
            self.vit = timm.create_model(cfg.name, **{**kwargs, **cfg.extra})
        except TypeError as e:
            if cfg.stem == "conv" and "embed_layer" in str(e):
                raise ConfigError(f"model.vision.stem: conv needs a timm ViT that takes an embed_layer; "
                                  f"{cfg.name} does not") from None
            raise
        self.prefix = getattr(self.vit, "num_prefix_tokens", 1)
        self.width = cfg.width
        self.patch_norm = cfg.final_norm == "patches"
        self.pixel_map = cfg.pixels != "half"
        if self.pixel_map:  # x = 0.5 x' + 0.5 in [0, 1], then (x - mean) / std: x' * scale + shift per channel
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in PIXEL_STATS[cfg.pixels])
            self.register_buffer("pixel_scale", INPUT_STD / std, persistent=False)
            self.register_buffer("pixel_shift", (INPUT_MEAN - mean) / std, persistent=False)
        self.init_position_table(cfg.image_size // cfg.patch_size)
        if cfg.init_checkpoint:
            self.load_checkpoint(cfg.init_checkpoint)

    @torch.no_grad()
    def init_position_table(self, grid: int) -> None:
        """A ViT trained from scratch starts with a 2-D sine-cosine table in its (still learnable) absolute
        position embedding instead of small random values: patches then know where they are from the first
        step, which box regression needs. Models without one (BEiT's relative bias) are left alone; a
        checkpoint, when given, overwrites it."""
        pos = getattr(self.vit, "pos_embed", None)
        if not isinstance(pos, nn.Parameter) or pos.shape[-2] < grid * grid or pos.shape[-1] % 4:
            return
        pos.zero_()
        pos[0, pos.shape[1] - grid * grid:] = sincos_2d(grid, pos.shape[-1])

    def load_checkpoint(self, path: str) -> tuple[list, list]:
        """Load local weights (nothing is downloaded); prints and returns the missing and unexpected keys."""
        state = load_state_file(path)
        if isinstance(self.vit.patch_embed, ConvStem) and "patch_embed.proj.weight" in state:
            raise ConfigError(f"{path}: weights with a linear patch embedding, but model.vision.stem is conv; "
                              f"set model.vision.stem: patch to load them")
        state = adapt_state_dict(state, self.vit)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        print(f"[x2vlm] vision weights from {path}: {len(missing)} missing {missing[:8]}, "
              f"{len(unexpected)} unexpected {unexpected[:8]}", flush=True)
        return missing, unexpected

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] normalised with mean = std = 0.5 -> [N, 1 + P, D]."""
        if self.pixel_map:
            images = images * self.pixel_scale.to(images.dtype) + self.pixel_shift.to(images.dtype)
        patches = self.vit.forward_features(images)[:, self.prefix:]
        if self.patch_norm:
            patches = self.vit.fc_norm(patches)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
