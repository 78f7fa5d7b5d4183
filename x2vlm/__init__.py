"""x2vlm: pre-training and fine-tuning of an X2-VLM-style vision-language model."""
from x2vlm._compat import patch_torchvision

patch_torchvision()

__version__ = "0.1.0"


def load(path, device="cpu", **kwargs):
    """An exported model ready for inference (x2vlm.inference.load): `m = x2vlm.load(EXPORT_DIR, device="cuda")`,
    then m.encode_images, encode_videos, encode_texts, similarity, rank, ground, answer."""
    from x2vlm.inference import load as load_export

    return load_export(path, device, **kwargs)
