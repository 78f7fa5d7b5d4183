"""FLOPs of a training step, counted from the configuration and a batch's shapes, and the peak they are held against.

Only matrix products count (linear layers, attention's two batched products, the patch convolution or the
convolutional stem's convolutions, the ITC similarities), two FLOPs per multiply-add, as torch.utils.flop_counter
does; normalisation, activations and softmax are left out. What a batch of each source kind runs (x2vlm.objectives):

    pretraining (image, region, video)   vision tower on N images (or N x F frames + temporal aggregator),
                                         text tower twice (the texts, then their MLM-masked copy), ITC,
                                         fusion three times: ITM on 3M pairs, MLM on M, box on the R region
                                         texts; ITM, MLM (masked tokens only) and box heads
    video_qa                             vision tower on N x F frames + aggregator, text tower once, fusion
                                         once, answer head

Padding counts (it is computed): text length is the batch's padded length, clips have the batch's longest
frame count. Backward is twice the forward, except where an input needs no gradient (the patch convolution: its
weight gradient only; a frozen vision tower: nothing). Recomputation is counted apart, since model FLOPs (and
MFU) leave it out: the towers named in `model.activation_checkpointing` run their layers' forward again in
backward, and the tiled ITC kernels recompute the similarities once more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from x2vlm.config import ModelConfig
from x2vlm.model.vision import ConvStem

# Dense bf16 / fp16 tensor-core peaks in TFLOPs (fp32 without TF32: the CUDA cores), by GPU name.
GPU_PEAK_TFLOPS = (  # (name fragment, {dtype: TFLOPs}); the first fragment found in the device name wins
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def attention(seqs: int, lq: int, lk: int, width: int) -> int:
    """Scores q k^T and their product with v, over all heads of `seqs` sequences."""
    return 4 * seqs * lq * lk * width


@dataclass
class Flops:
    """FLOPs of one batch (or a sum of them): model FLOPs forward and backward, and recomputation apart."""
    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0
    parts: dict = field(default_factory=dict)  # forward FLOPs by part of the model

    @property
    def model(self) -> float:
        """What MFU counts: forward + backward."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        """What the hardware ran: model FLOPs and recomputation."""
        return self.model + self.recompute

    def add(self, part: str, forward: float, backward: float = 2.0, recompute: float = 0.0) -> None:
        """A part's forward FLOPs, with its backward and recomputation as multiples of them."""
        self.forward += forward
        self.backward += backward * forward
        self.recompute += recompute * forward
        self.parts[part] = self.parts.get(part, 0.0) + forward


class FlopModel:
    """FLOPs per batch of each source kind; `world` ranks share ITC's similarity matrix (each rank's texts and
    images against every rank's)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, itc_impl: str = "auto", world: int = 1):
        self.cfg, self.vocab, self.world = cfg, vocab_size, world
        v, t, f = cfg.vision, cfg.text, cfg.fusion
        self.patches = (v.image_size // v.patch_size) ** 2
        # the ViT's own tokens: its patches and prefix tokens ([CLS], registers), which attention sees
        self.vit_tokens = self.patches + int(v.extra.get("class_token", True)) + int(v.extra.get("reg_tokens", 0))
        self.vit_mlp = int(v.width * v.extra.get("mlp_ratio", 4.0))
        # a learnt scale after each block's MLP (BEiT's gamma, timm's init_values) needs the MLP's output again
        self.vit_layer_scale = v.name.startswith("beit") or bool(v.extra.get("init_values"))
        self.fusion_post_ln = f.style == "bert"  # LayerNorm after each layer: it needs the last product's output
        self.tokens = 1 + self.patches  # what the vision encoder outputs: mean token + patches
        self.dv, self.dt = v.width, t.hidden_size
        self.ckpt = set(cfg.activation_checkpointing)
        self.itc_recompute = 0.0 if itc_impl == "reference" else 1.0
        self.box_pool_reference = cfg.box_pool_impl == "reference"
        self.fusion_layers, self.fusion_mlp = f.layers, f.intermediate_size

    # --- towers (forward FLOPs added to `out`) ---------------------------------------------------------------
    def vision(self, out: Flops, frames: int) -> None:
        v = self.cfg.vision
        trainable = not v.frozen
        if v.stem == "conv":  # stride-2 3x3 convolutions, then a 1x1 one to the tokens
            side, channels = v.image_size, 3
            for i, width in enumerate(ConvStem.widths(v.patch_size, self.dv)):
                side = (side + 1) // 2
                grad = (1.0 if i == 0 else 2.0) if trainable else 0.0  # the first one's input (images): none
                out.add("vision", linear(frames * side * side, 9 * channels, width), backward=grad)
                channels = width
            out.add("vision", linear(frames * self.patches, channels, self.dv), backward=2.0 if trainable else 0.0)
        else:
            patch = linear(frames * self.patches, 3 * v.patch_size ** 2, self.dv)
            out.add("vision", patch, backward=1.0 if trainable else 0.0)  # images need no gradient
        t, d, n = self.vit_tokens, self.dv, frames * v.depth
        dense = linear(t, d, 3 * d) + linear(t, d, d) + linear(t, d, self.vit_mlp) + linear(t, self.vit_mlp, d)
        last = 0 if self.vit_layer_scale else linear(t, self.vit_mlp, d)
        self.layers(out, "vision", n * dense, n * attention(1, t, t, d), trainable, "vision" in self.ckpt, n * last)

    def temporal(self, out: Flops, clips: int, frames: int) -> None:
        """The `attention` aggregator's temporal transformer over each token position, and the motion summary."""
        video = self.cfg.video
        if video.aggregator != "attention":
            return
        rows, d = clips * self.tokens * frames, self.dv  # a sequence over time at every token position
        dense = linear(rows, d, 3 * d) + linear(rows, d, d) + linear(rows, d, 4 * d) + linear(rows, 4 * d, d)
        self.layers(out, "temporal", video.layers * dense,
                    video.layers * attention(clips * self.tokens, frames, frames, d))
        grad_in = 0.0 if self.cfg.vision.frozen else 1.0  # the motion moments read the frames themselves
        out.add("temporal", 2 * clips * self.patches * d * 2, backward=grad_in)  # moments: trend x patch coords
        out.add("temporal", linear(clips, 2 * d, d), backward=1.0 + grad_in)

    def text(self, out: Flops, texts: int, length: int) -> None:
        t, d = self.cfg.text, self.dt
        dense = 4 * linear(length, d, d) + linear(length, d, t.intermediate_size) \
            + linear(length, t.intermediate_size, d)
        n = texts * t.layers
        self.layers(out, "text", n * dense, n * attention(1, length, length, d), checkpointed="text" in self.ckpt)

    def fusion(self, out: Flops, texts: int, length: int, images: int, first: bool) -> None:
        """One pass of the fusion encoder: `texts` texts of `length` tokens attend to the tokens of `images`
        images (keys and values projected once per image; `first`: a region token per text as well)."""
        d, dv, v = self.dt, self.dv, self.tokens
        per_text = 6 * linear(length, d, d) + linear(length, d, self.fusion_mlp) + linear(length, self.fusion_mlp, d)
        kv = 2 * linear(images * v, dv, d) + (2 * linear(texts, dv, d) if first else 0)
        attn = texts * (attention(1, length, length, d) + attention(1, length, v, d))
        last = 0 if self.fusion_post_ln else texts * linear(length, self.fusion_mlp, d)
        n = self.fusion_layers
        self.layers(out, "fusion", n * (texts * per_text + kv), n * attn, checkpointed="fusion" in self.ckpt,
                    last=n * last)

    @staticmethod
    def layers(out: Flops, part: str, dense: float, attn: float, trainable: bool = True, checkpointed: bool = False,
               last: float = 0.0) -> None:
        """Transformer layers: their dense products and attention. Attention's backward kernels compute the
        scores once more (half its forward, as recomputation). Checkpointed layers run their forward again in
        backward, up to the last result backward needs: `last` is the final product of each layer when nothing
        after it but a residual sum needs its output (then it is not run again)."""
        again = trainable and checkpointed
        grad = 2.0 if trainable else 0.0
        out.add(part, dense - last, backward=grad, recompute=1.0 if again else 0.0)
        out.add(part, last, backward=grad)
        out.add(part, attn, backward=grad, recompute=(1.0 if again else 0.0) + (0.5 if trainable else 0.0))

    @staticmethod
    def mlp_head(out: Flops, part: str, rows: int, width: int, outputs: int) -> None:
        out.add(part, linear(rows, width, 2 * width) + linear(rows, 2 * width, outputs))

    # --- objectives -------------------------------------------------------------------------------------------
    def pretraining(self, images: int, texts: int, length: int, masked: int, regions: int, frames: int = 0,
                    global_texts: int | None = None) -> Flops:
        """A pre-training batch: `images` images (or clips of `frames` frames each, padding included), `texts`
        texts padded to `length` tokens, `masked` MLM-masked tokens, `regions` region texts; ITC against
        `global_texts` rows (default: texts x world)."""
        out = Flops()
        if frames:
            self.vision(out, images * frames)
            self.temporal(out, images, frames)
        else:
            self.vision(out, images)
        if self.box_pool_reference:  # the plain definition: a masked sum over every patch per box
            out.add("regions", 2 * texts * self.patches * self.dv)
        self.text(out, 2 * texts, length)  # the texts, then their MLM-masked copy
        e, g = self.cfg.embed_dim, texts * self.world if global_texts is None else global_texts
        out.add("itc", linear(texts, self.dv, e) + linear(texts, self.dt, e))
        out.add("itc", 2 * linear(texts, e, g), recompute=self.itc_recompute)  # image->text and text->image
        self.fusion(out, 3 * texts, length, images, first=True)  # ITM: positives and both negatives
        self.mlp_head(out, "itm", 3 * texts, self.dt, 2)
        self.fusion(out, texts, length, images, first=True)  # MLM
        out.add("mlm", linear(masked, self.dt, self.dt) + linear(masked, self.dt, self.vocab))
        if regions:
            self.fusion(out, regions, length, images, first=False)  # box: the whole image
            self.mlp_head(out, "box", regions, self.dt, 4)
        return out

    def video_qa(self, clips: int, frames: int, questions: int, length: int) -> Flops:
        out = Flops()
        self.vision(out, clips * frames)
        self.temporal(out, clips, frames)
        self.text(out, questions, length)
        self.fusion(out, questions, length, clips, first=False)
        self.mlp_head(out, "qa", questions, self.dt, self.cfg.qa_answers)
        return out

    def batch(self, kind: str, batch: dict) -> Flops:
        """FLOPs of a batch of a source of `kind` (the loader's batch format: CPU tensors, so reading them costs
        no device synchronisation)."""
        m, length = batch["text_ids"].shape
        if kind == "video_qa":
            n, f = batch["videos"].shape[:2]
            return self.video_qa(n, f, m, length)
        masked = int((batch["mlm_labels"] != -100).sum())
        regions = int(batch["is_region"].sum())
        if "videos" in batch:
            n, f = batch["videos"].shape[:2]
            return self.pretraining(n, m, length, masked, regions, frames=f)
        return self.pretraining(batch["images"].shape[0], m, length, masked, regions)


# --- peak ----------------------------------------------------------------------------------------------------

def measured_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          size: int = 1024, seconds: float = 0.3) -> float:
    """The best rate (FLOP/s) of square matrix products of `size` on `device` in `dtype` with the threads this
    process has, over about `seconds`."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global generators alone
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    a @ b  # warm-up
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        now = time.perf_counter()
        best = min(best, now - t0)
        if now > end:
            break
    return 2 * size ** 3 / best


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device in `precision`, where it comes from): a table for known GPUs, else (CPUs,
    other GPUs) the measured matrix-product rate of this process."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAK_TFLOPS:
            if fragment in name:
                return peaks[precision] * 1e12, f"{name} {precision} table"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    size = 512 if device.type == "cpu" else 8192  # (a CPU core reaches its best rate already at 512)
    return measured_matmul_flops(device, dtype, size), f"measured {precision} matmul on {device.type}{threads}"
