"""Make torchvision importable next to a CPU-only torch.

The torchvision wheel that matches torch 2.13 is a CUDA build. Next to a CPU torch its compiled ops fail to
load, and `import torchvision` then raises "operator torchvision::nms does not exist", which breaks
`import timm` and parts of `transformers`. Before anything imports torchvision we try to load its compiled
library; if that fails we register the two operator schemas that torchvision's Python code looks up at import
time. torchvision's transforms then work; `torchvision.ops.nms` stays unusable (this project never calls it).
On a machine where torchvision's ops load normally this does nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_LIB = None  # keeps the fragment library alive for the life of the process


def patch_torchvision() -> None:
    global _LIB
    if "torchvision" in sys.modules or _LIB is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return
            except (OSError, RuntimeError):
                break
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
