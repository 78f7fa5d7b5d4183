"""Fused operations: box pooling of region tokens and the contrastive (ITC) loss, in memory linear in the batch.

Each operation has three implementations, picked by its `impl` argument:
- "reference": the plain PyTorch definition (gather [M, P, D] + masked mean; `itc_loss` on the full B x N
  logits). Tests compare the others against it.
- "cpu" (box pooling) / "chunked" (contrastive loss): PyTorch without the big intermediates, with custom
  autograd Functions: a summed-area table and a difference-array backward for box pooling; row and column
  blocks, a streaming logsumexp and recomputation in backward for the loss. Runs on any device; the fallback.
- "triton": Triton kernels for CUDA tensors (also runnable on CPU tensors under TRITON_INTERPRET=1, which must
  be set before triton is first imported).
"auto" (the default) picks "triton" for CUDA tensors when Triton is importable and CUDA is available, and the
PyTorch fallback ("cpu" / "chunked") otherwise. Triton modules are imported only when "triton" is used.
"""
from x2vlm.ops.box_pool import box_mask, box_pool, box_pool_reference, grid_boxes
from x2vlm.ops.contrastive import ContrastiveOutput, contrastive_loss, gumbel_max_reference, itc_loss

__all__ = ["box_mask", "box_pool", "box_pool_reference", "grid_boxes", "ContrastiveOutput", "contrastive_loss",
           "gumbel_max_reference", "itc_loss"]
