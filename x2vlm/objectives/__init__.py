"""Training objectives: each turns a batch and the model into losses and statistics. Chosen by a data source's
kind: image, region and video sources learn X2-VLM's pre-training losses (ITC, ITM, MLM, box), video QA sources
an answer classifier."""
from x2vlm.config import LossConfig
from x2vlm.objectives.pretraining import Pretraining
from x2vlm.objectives.video_qa import VideoQA

__all__ = ["Pretraining", "VideoQA", "for_source"]


def for_source(kind: str, loss_cfg: LossConfig):
    """The objective that trains on a source of this kind."""
    if kind == "video_qa":
        return VideoQA()
    if kind in ("image", "region", "video"):
        return Pretraining(loss_cfg)
    raise ValueError(f"no objective for a {kind!r} source")
