"""Does a checkpoint trained on ShapesWorld know the shapes and colours of the objects it sees? Masked-word
probes on held-out images, through the model's own MLM head:

    python scripts/probe_shapes.py runs/demo/run/checkpoints/step500 runs/demo/data/heldout-000000.tar

- captions: every shape word (then every colour word) of each held-out caption masked at once; the accuracy of
  the MLM head's choice among the five shapes (seven colours) against the word masked;
- regions: "the <colour> [MASK]" for every shape of every held-out image, fused with that shape's box only (the
  region CLS and the patches inside the box, as region texts are in pre-training) and with the whole image.

A model that reads shapes gets the regions' shape far above the most frequent shape; one that reads only colours
stays at it. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from x2vlm.config import ConfigError  # noqa: E402
from x2vlm.data.pipeline import iterate_samples  # noqa: E402
from x2vlm.data.transforms import eval_transform  # noqa: E402
from x2vlm.demo.shapesworld import COLOURS, SHAPES  # noqa: E402
from x2vlm.eval.run import make_tokenize  # noqa: E402
from x2vlm.pretrained import load_pretrained  # noqa: E402


def word_ids(tokenizer, words) -> torch.Tensor:
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"error: the tokenizer splits one of {list(words)}: the probe needs single tokens")
    return torch.tensor([i[0] for i in ids])


def majority(labels) -> float:
    return Counter(labels).most_common(1)[0][1] / len(labels)


@torch.no_grad()
def caption_probe(model, tokenizer, tokenize, images, captions, words) -> dict:
    """Every word of `words` in each caption masked at once; accuracy of the MLM head's choice among `words`."""
    cand = word_ids(tokenizer, words)
    ids, atts = tokenize(captions)
    masked = torch.isin(ids, cand)
    if not masked.any():
        raise SystemExit(f"error: no held-out caption names one of {list(words)}")
    fused = model.fuse(model.encode_text(ids.masked_fill(masked, tokenizer.mask_token_id), atts),
                       atts, model.encode_image(images))
    pred = model.mlm_head(fused[masked]).float()[:, cand].argmax(1)
    truth = (ids[masked][:, None] == cand[None]).float().argmax(1)
    return {"acc": float((pred == truth).float().mean()), "n": int(masked.sum()), "majority": majority(truth.tolist())}


@torch.no_grad()
def region_probe(model, tokenizer, tokenize, images, regions) -> dict:
    """"the <colour> [MASK]" per shape, fused with its box and with the whole image: shape accuracy."""
    cand = word_ids(tokenizer, SHAPES)
    index = torch.tensor([i for i, _, _ in regions])
    vis = model.encode_image(images)
    cls, box_mask = model.regions(vis, torch.tensor([b for _, b, _ in regions]), index)
    ids, atts = tokenize([f"the {r['colour']} {tokenizer.mask_token}" for _, _, r in regions])
    truth = torch.tensor([SHAPES.index(r["shape"]) for _, _, r in regions])
    out = {"n": len(regions), "majority": majority(truth.tolist())}
    for name, extra in (("box", {"vis_mask": box_mask, "first": cls}), ("whole_image", {})):
        fused = model.fuse(model.encode_text(ids, atts), atts, vis, index=index, **extra)
        pred = model.mlm_head(fused[ids == tokenizer.mask_token_id]).float()[:, cand].argmax(1)
        out[f"acc_{name}"] = float((pred == truth).float().mean())
    return out


def main() -> None:
    try:
        probe()
    except (ConfigError, FileNotFoundError) as e:  # a missing checkpoint or shard, a configuration it refuses
        raise SystemExit(f"error: {e}") from None


def probe() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run, checkpoint or export folder")
    p.add_argument("shards", nargs="+", help="held-out ShapesWorld image shards (x2vlm demo's heldout-*.tar)")
    p.add_argument("--limit", type=int, default=300, help="images to probe (default 300)")
    args = p.parse_args()
    model, tokenizer, cfg = load_pretrained(args.checkpoint)
    tokenize = make_tokenize(tokenizer, cfg.model.text.max_len)
    size = cfg.model.vision.image_size
    images, captions, regions = [], [], []
    for s in iterate_samples(args.shards):
        if len(images) == args.limit:
            break
        regs = s["json"].get("regions") or []
        image, boxes = eval_transform(s["image"], [r["box"] for r in regs], size)
        regions += [(len(images), list(map(float, b)), r) for b, r in zip(boxes, regs)]
        images.append(image)
        captions.append(s["json"].get("caption") or "")
    if not regions:
        raise SystemExit("error: no ShapesWorld regions in the shards given")
    images = torch.stack(images)
    out = {"captions": {"shape": caption_probe(model, tokenizer, tokenize, images, captions, SHAPES),
                        "colour": caption_probe(model, tokenizer, tokenize, images, captions, sorted(COLOURS))},
           "regions": region_probe(model, tokenizer, tokenize, images, regions), "images": len(images)}
    c, r = out["captions"], out["regions"]
    print(f"captions, shape words masked: {c['shape']['acc']:.3f} (most frequent {c['shape']['majority']:.3f}); "
          f"colour words masked: {c['colour']['acc']:.3f} (most frequent {c['colour']['majority']:.3f})")
    print(f"regions, the shape of 'the <colour> [MASK]': {r['acc_box']:.3f} with its box, {r['acc_whole_image']:.3f} "
          f"with the whole image (most frequent {r['majority']:.3f}, {r['n']} shapes)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
