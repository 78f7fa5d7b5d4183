"""The model: vision, text and fusion encoders, heads, region pooling, and X2VLM that ties them together."""
from x2vlm.model.x2vlm import X2VLM

__all__ = ["X2VLM"]
