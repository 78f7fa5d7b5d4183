"""Benchmark: how fast the tiny preset's vision encoder, trained from scratch, learns the shapes of objects, with
the ViT's linear patch embedding and with the convolutional stem (`model.vision.stem`), in the same run.

    python scripts/bench_stem.py                  # 400 steps per stem, about 2 minutes each on 2 cores
    python scripts/bench_stem.py --steps 200 --seeds 0 1 2

Each setting trains the encoder and a linear classifier on the region tokens (the mean of the patches in each
shape's box, as the model pools regions) to name the shape of every object in ShapesWorld images (five shapes in
seven colours), fp32, AdamW at lr 1e-3, 32 images a step, and reports the held-out accuracy every 100 steps and
the seconds per step. The last line printed is one JSON object: per stem the median over seeds of each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from x2vlm.config import load_config, update  # noqa: E402
from x2vlm.data.transforms import eval_transform  # noqa: E402
from x2vlm.demo.shapesworld import SHAPES, generate  # noqa: E402
from x2vlm.model.vision import VisionEncoder  # noqa: E402
from x2vlm.ops import box_pool, grid_boxes  # noqa: E402



def regions(samples, size: int) -> list:
    """(image [3, H, W], boxes [R, 4] in pixels, shape labels [R]) per image with at least one shape."""
    out = []
    for s in samples:
        regs = s.get("regions") or []
        if regs:
            image, boxes = eval_transform(s["image"], [r["box"] for r in regs], size)
            out.append((image, torch.tensor(boxes), torch.tensor([SHAPES.index(r["shape"]) for r in regs])))
    return out


def stack(items: list):
    images = torch.stack([i for i, _, _ in items])
    boxes = torch.cat([b for _, b, _ in items])
    labels = torch.cat([y for _, _, y in items])
    index = torch.cat([torch.full((len(y),), k) for k, (_, _, y) in enumerate(items)])
    return images, boxes, labels, index


def run(stem: str, seed: int, train: list, test: list, steps: int, every: int) -> dict:
    cfg = update(load_config("tiny"), {"model.vision.stem": stem}).model.vision
    torch.manual_seed(seed)
    encoder, head = VisionEncoder(cfg), torch.nn.Linear(cfg.width, len(SHAPES))
    grid = cfg.image_size // cfg.patch_size
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)

    def logits(images, boxes, index):
        tokens = encoder(images)[:, 1:]
        return head(box_pool(tokens, grid_boxes(boxes, cfg.image_size, cfg.patch_size), index, grid))

    gen = torch.Generator().manual_seed(seed)
    accuracy, seconds = {}, 0.0
    for step in range(1, steps + 1):
        images, boxes, labels, index = stack([train[i] for i in torch.randint(len(train), (32,), generator=gen)])
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(logits(images, boxes, index), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        if step % every == 0:
            with torch.no_grad():
                images, boxes, labels, index = stack(test)
                accuracy[step] = float((logits(images, boxes, index).argmax(1) == labels).float().mean())
            print(f"{stem:5s} seed {seed} step {step}: held-out shape accuracy {accuracy[step]:.3f}", flush=True)
    return {"accuracy": accuracy, "s_per_step": seconds / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-images", type=int, default=1500)
    p.add_argument("--test-images", type=int, default=300)
    args = p.parse_args()
    size = load_config("tiny").model.vision.image_size
    train = regions(generate("train", args.train_images, seed=0, image_size=size), size)
    test = regions(generate("heldout", args.test_images, seed=1, image_size=size), size)
    labels = stack(test)[2]
    chance = max(int((labels == k).sum()) for k in range(len(SHAPES))) / len(labels)
    results = {}
    for stem in ("patch", "conv"):
        runs = [run(stem, s, train, test, args.steps, args.every) for s in args.seeds]
        results[stem] = {"accuracy": {step: statistics.median(r["accuracy"][step] for r in runs)
                                      for step in runs[0]["accuracy"]},
                         "s_per_step": statistics.median(r["s_per_step"] for r in runs)}
    results["time_ratio_conv_over_patch"] = results["conv"]["s_per_step"] / results["patch"]["s_per_step"]
    results["majority_class_accuracy"] = chance
    patch, conv = results["patch"]["accuracy"], results["conv"]["accuracy"]
    for step in patch:
        print(f"step {step}: patch {patch[step]:.3f}  conv {conv[step]:.3f}")
    ratio = results["time_ratio_conv_over_patch"]
    print(f"seconds per step: conv / patch = {ratio:.2f}; majority class {chance:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
