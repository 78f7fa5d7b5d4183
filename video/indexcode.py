"""Frames that carry their own index in their pixels, to check that a decoder returns exactly the right frames.

The index is written in binary as a 4 x 4 grid of blocks, bit b (least significant first, row by row) black
(0) or white (255). Blocks are large and far apart in grey level, so the index survives lossy compression and
chroma subsampling: `read_index` thresholds the mean of each block's inner half.
"""
from __future__ import annotations

import numpy as np

GRID = 4
BITS = GRID * GRID


def index_frame(index: int, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 [height, width, 3] frame showing `index` (0 <= index < 2**16); height and width multiples of 4."""
    if not 0 <= index < 2 ** BITS:
        raise ValueError(f"index {index} does not fit in {BITS} bits")
    bh, bw = height // GRID, width // GRID
    img = np.zeros((height, width, 3), np.uint8)
    for b in range(BITS):
        if (index >> b) & 1:
            r, c = divmod(b, GRID)
            img[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = 255
    return img


def read_index(frame: np.ndarray) -> int:
    """The index shown by a (decoded) frame made with index_frame."""
    h, w = frame.shape[:2]
    bh, bw = h // GRID, w // GRID
    value = 0
    for b in range(BITS):
        r, c = divmod(b, GRID)
        block = frame[r * bh + bh // 4:(r + 1) * bh - bh // 4, c * bw + bw // 4:(c + 1) * bw - bw // 4]
        if block.mean() > 127:
            value |= 1 << b
    return value
