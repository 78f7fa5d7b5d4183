"""What a run measures between two log steps, and its reduction over ranks at the log step.

Per micro-batch the loop hands over each source's batch (before it moves to the device: counts and FLOPs are read
from CPU tensors) and its losses, which are added up on the device: nothing is read back until the log step, so
steps between logs cost no host synchronisation. At a log step every rank calls `reduce` (two all-reduces: sums
and maxima) and gets the same numbers:

    loss, <source>/<term>            mean over ranks and micro-batches (terms a batch lacks, such as a box loss
                                     without region texts, are averaged over the batches that had them)
    loss_max, <source>/<term>_max    the largest of the ranks' means
    samples_per_s                    all ranks together
    images_per_s, region_texts_per_s, clips_per_s, frames_per_s
                                     per device (frames: real ones, padding left out)
    step_time_s, data_wait_s_per_step, data_wait_frac, data_load_pct (mean over ranks), data_load_pct_max
    tflop_per_step, tflops_per_device, mfu_pct, hfu_pct (recomputation included), <source>/flops_pct
    memory/max_allocated_gb, memory/max_reserved_gb, memory/alloc_retries, memory/ooms   (GPU, max over ranks)
    memory/peak_rss_gb, memory/rss_gb                                                    (CPU, max over ranks)
"""
from __future__ import annotations

import resource
import time

import torch

from x2vlm import distributed
from x2vlm.train.flops import FlopModel

PRETRAINING_TERMS = ("loss", "itc", "itm", "mlm", "bbox", "giou", "itm_acc")
TERMS = {"image": PRETRAINING_TERMS, "region": PRETRAINING_TERMS, "video": PRETRAINING_TERMS,
         "video_qa": ("loss", "qa", "qa_acc")}  # what each kind's objective returns (x2vlm.objectives)
COUNTS = ("samples", "images", "region_texts", "texts", "clips", "frames", "flops", "recompute", "wait")
GB = 1024 ** 3


def memory(device: torch.device) -> dict:
    """This process's memory: on a GPU the peaks since the last call (they are reset) and the allocator's
    retries and out-of-memory count; on a CPU the peak and current resident set size."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        out = {"memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
               "memory/max_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
               "memory/alloc_retries": float(stats.get("num_alloc_retries", 0)),
               "memory/ooms": float(stats.get("num_ooms", 0))}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        rss = 0
    return {"memory/peak_rss_gb": max(peak_kib * 1024, rss) / GB, "memory/rss_gb": rss / GB}


class StepStats:
    """Loss terms, samples by modality, FLOPs, data-wait and wall time of the steps since the last log step."""

    def __init__(self, sources: list, flops: FlopModel, device: torch.device, peak_flops: float, start: int):
        self.kinds = {s.name: s.kind for s in sources}
        self.names = ["loss"] + [f"{s.name}/{t}" for s in sources for t in TERMS[s.kind]]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.counters = [*COUNTS, *(f"{s.name}/flops" for s in sources)]
        self.flops, self.device, self.peak = flops, device, peak_flops
        self.restart(start)

    def restart(self, step: int) -> None:
        self.first, self.t0 = step, time.perf_counter()
        self.sums = torch.zeros(len(self.names), device=self.device)
        self.counts = [0] * len(self.names)
        self.host = dict.fromkeys(self.counters, 0.0)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the window's wall time."""
        self.t0 += seconds

    def batch(self, source: str, batch: dict, wait_s: float) -> None:
        """A batch as the loader gave it (CPU tensors) and the seconds spent waiting for it."""
        kind, h = self.kinds[source], self.host
        n = len(batch["keys"])
        h["wait"] += wait_s
        h["samples"] += n
        h["texts"] += batch["text_ids"].shape[0]
        if "videos" in batch:
            h["clips"] += n
            h["frames"] += int(batch["frame_mask"].sum())
        else:
            h["images"] += n
        if "is_region" in batch:
            h["region_texts"] += int(batch["is_region"].sum())
        f = self.flops.batch(kind, batch)
        h["flops"] += f.model
        h["recompute"] += f.recompute
        h[f"{source}/flops"] += f.model

    def losses(self, source: str, losses: dict) -> None:
        """A micro-batch's loss terms (device tensors; added up where they are)."""
        for term, value in losses.items():
            name = f"{source}/{term}"
            if name not in self.index:
                raise KeyError(f"loss term {term!r} of source {source!r} is not among those of its kind "
                               f"{self.kinds[source]!r}: add it to x2vlm.train.telemetry.TERMS")
            self._add(self.index[name], value)

    def total(self, loss: torch.Tensor) -> None:
        """A micro-batch's weighted total over the sources."""
        self._add(0, loss)

    def _add(self, i: int, value: torch.Tensor) -> None:
        self.sums[i] += value.detach().float().reshape(())
        self.counts[i] += 1

    def reduce(self, step: int) -> dict:
        """The window's numbers over all ranks (a collective: every rank calls it at the same steps); the window
        then starts again."""
        world = distributed.world_size()
        wall = time.perf_counter() - self.t0
        steps = max(1, step - self.first)
        mem = memory(self.device)
        # sums: loss sums and counts, then the host counters
        host = torch.tensor([float(c) for c in self.counts] + [self.host[k] for k in self.counters],
                            dtype=torch.float64)
        total = distributed.all_reduce(torch.cat([self.sums.double(), host.to(self.device)]), "sum").tolist()
        n = len(self.names)
        sums, counts, counted = total[:n], total[n:2 * n], dict(zip(self.counters, total[2 * n:]))
        # maxima: each rank's means, its data-wait share, its window's wall time and memory
        counts_here = torch.tensor(self.counts, device=self.device)
        means = torch.where(counts_here > 0, self.sums / counts_here.clamp(min=1), torch.full_like(self.sums, -1e30))
        own = torch.tensor([self.host["wait"] / max(wall, 1e-9), wall, *mem.values()], dtype=torch.float64)
        top = distributed.all_reduce(torch.cat([means.double(), own.to(self.device)]), "max").tolist()
        wait_share_max, wall = top[n], top[n + 1]
        wall = max(wall, 1e-9)
        out: dict = {}
        for i, name in enumerate(self.names):
            if counts[i]:
                out[name] = sums[i] / counts[i]
                out[f"{name}_max"] = top[i]
        out["samples_per_s"] = counted["samples"] / wall
        kinds = set(self.kinds.values())
        for key, present in (("images", kinds & {"image", "region"}), ("region_texts", "region" in kinds),
                             ("clips", kinds & {"video", "video_qa"}), ("frames", kinds & {"video", "video_qa"})):
            if present:
                out[f"{key}_per_s"] = counted[key] / world / wall
        wait = counted["wait"] / world
        out.update({"step_time_s": wall / steps, "data_wait_s_per_step": wait / steps,
                    "data_wait_frac": wait / wall, "data_load_pct": 100 * wait / wall,
                    "data_load_pct_max": 100 * wait_share_max})
        flops = counted["flops"] / world
        out.update({"tflop_per_step": flops / steps / 1e12, "tflops_per_device": flops / wall / 1e12,
                    "mfu_pct": 100 * flops / wall / self.peak,
                    "hfu_pct": 100 * (flops + counted["recompute"] / world) / wall / self.peak,
                    "peak_tflops": self.peak / 1e12})
        for source in self.kinds:
            out[f"{source}/flops_pct"] = 100 * counted[f"{source}/flops"] / max(counted["flops"], 1.0)
        out.update(dict(zip(mem, top[n + 2:])))
        self.restart(step)
        return out
