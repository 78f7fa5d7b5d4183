"""What a run measures between log steps (x2vlm.train.telemetry), in a world of one: loss terms are added up on the
device with nothing read back until the log step, averaged over the micro-batches that had them; samples are
counted by modality; FLOPs, MFU and the data-loading share follow from the counts and the window's time."""
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

from x2vlm.config import SourceConfig, load_config
from x2vlm.train.flops import FlopModel
from x2vlm.train.telemetry import StepStats, memory

READ_BACK = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__format__"}


class ReadBacks(TorchFunctionMode):
    """Records every tensor method that copies a value to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READ_BACK:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def image_batch(n: int, texts: int, regions: int = 0) -> dict:
    return {"keys": [str(i) for i in range(n)], "images": torch.zeros(n, 3, 64, 64),
            "text_ids": torch.ones(texts, 9, dtype=torch.long), "mlm_labels": torch.full((texts, 9), -100),
            "is_region": torch.arange(texts) < regions}


def video_batch(n: int, frames: int, real: int) -> dict:
    mask = torch.zeros(n, frames, dtype=torch.bool)
    mask.view(-1)[:real] = True
    return {"keys": [str(i) for i in range(n)], "videos": torch.zeros(n, frames, 3, 64, 64), "frame_mask": mask,
            "text_ids": torch.ones(n, 9, dtype=torch.long), "mlm_labels": torch.full((n, 9), -100),
            "is_region": torch.zeros(n, dtype=torch.bool)}


@pytest.fixture
def stats():
    cfg = load_config("tiny")
    sources = [SourceConfig(name="images", kind="image"), SourceConfig(name="regions", kind="region"),
               SourceConfig(name="clips", kind="video")]
    return StepStats(sources, FlopModel(cfg.model, 100), torch.device("cpu"), peak_flops=1e11, start=10)


def test_losses_stay_on_the_device_until_the_log_step(stats):
    t = lambda v: torch.tensor(v)  # noqa: E731
    with ReadBacks() as mode:
        for bbox in (None, 0.5, 1.5):  # a region batch without region texts has no box loss
            losses = {"loss": t(3.0), "itc": t(1.0), "itm": t(0.5), "mlm": t(1.5), "itm_acc": t(0.75)}
            stats.losses("regions", losses if bbox is None else {**losses, "bbox": t(bbox), "giou": t(2 * bbox)})
            stats.total(t(6.0))
    assert mode.calls == []
    values = stats.reduce(13)
    assert values["loss"] == pytest.approx(6.0) and values["loss_max"] == pytest.approx(6.0)
    assert values["regions/bbox"] == pytest.approx(1.0) and values["regions/giou"] == pytest.approx(2.0)
    assert values["regions/itm_acc"] == pytest.approx(0.75) and "images/loss" not in values
    with pytest.raises(KeyError, match="qa_acc"):  # a term its kind does not declare
        stats.losses("images", {"qa_acc": t(1.0)})


def test_throughput_flops_and_data_loading(stats):
    stats.restart(0)
    stats.batch("images", image_batch(4, 4), wait_s=0.0)
    stats.batch("regions", image_batch(2, 6, regions=5), wait_s=0.0)
    stats.batch("clips", video_batch(3, 4, real=10), wait_s=0.05)
    time.sleep(0.2)
    values = stats.reduce(2)
    wall = values["step_time_s"] * 2
    assert 0.2 <= wall < 5
    assert values["samples_per_s"] == pytest.approx(9 / wall)
    assert values["images_per_s"] == pytest.approx(6 / wall) and values["region_texts_per_s"] == pytest.approx(5 / wall)
    assert values["clips_per_s"] == pytest.approx(3 / wall) and values["frames_per_s"] == pytest.approx(10 / wall)
    assert values["data_load_pct"] == pytest.approx(100 * 0.05 / wall)
    assert values["data_wait_s_per_step"] == pytest.approx(0.025)
    flops = stats.flops
    expected = (flops.batch("image", image_batch(4, 4)).model + flops.batch("region", image_batch(2, 6, 5)).model
                + flops.batch("video", video_batch(3, 4, 10)).model)
    assert values["tflop_per_step"] == pytest.approx(expected / 2 / 1e12)
    assert values["mfu_pct"] == pytest.approx(100 * expected / wall / 1e11)
    assert values["hfu_pct"] > values["mfu_pct"]
    assert sum(values[f"{s}/flops_pct"] for s in ("images", "regions", "clips")) == pytest.approx(100)
    assert values["memory/peak_rss_gb"] >= values["memory/rss_gb"] > 0
    # the window starts again: nothing carried over
    again = stats.reduce(3)
    assert again["samples_per_s"] == 0 and "loss" not in again


def test_evaluation_time_is_left_out(stats):
    stats.restart(0)
    time.sleep(0.3)
    stats.exclude(0.3)
    assert stats.reduce(1)["step_time_s"] < 0.1


def test_memory_on_a_cpu():
    m = memory(torch.device("cpu"))
    assert set(m) == {"memory/peak_rss_gb", "memory/rss_gb"} and m["memory/peak_rss_gb"] > 0.01
