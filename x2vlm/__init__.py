"""x2vlm: pre-training and fine-tuning of an X2-VLM-style vision-language model."""
from x2vlm._compat import patch_torchvision

patch_torchvision()

__version__ = "0.1.0"
