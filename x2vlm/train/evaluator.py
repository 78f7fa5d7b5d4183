"""Held-out evaluation during training (`train.eval_every`, shards in `train.eval`): the evaluations of
`x2vlm evaluate` (x2vlm.eval) on the first `limit` items of each held-out set, run on the live weights at fixed
steps, with examples for pictures and tables.

Every rank calls `run` at the same steps (it decides them: every `eval_every` steps, step 0 of a run that starts
from scratch, and the run's last step; a resumed run evaluates at the same steps). The main rank evaluates a
float32 copy of the model on the training device: the live weights are copied into it (under ZeRO-3 inside
distributed.full_parameters, which every rank enters, so each rank gathers the full weights for the copy),
the other ranks wait at a barrier. Evaluation samples nothing (no dropout, clips read at the evaluation offsets)
and the global random generators are restored afterwards, so a run with evaluation trains exactly as one without.

The held-out data are read once. Pictures (thumbnails of pool items, grounding images, clip keyframes) are written
once under OUT/media/ and referred to by path (relative to OUT) in the results.
"""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import torch
from PIL import Image

from x2vlm import distributed
from x2vlm.config import RunConfig, read_answer_vocab
from x2vlm.data.transforms import MEAN, STD
from x2vlm.eval.grounding import evaluate_grounding
from x2vlm.eval.retrieval import evaluate_retrieval
from x2vlm.eval.run import (clips, load_captioned_pool, load_grounding, load_video_pool, make_tokenize, nonempty,
                            protocol)
from x2vlm.eval.video import direction_probe
from x2vlm.eval.videoqa import evaluate_videoqa
from x2vlm.pretrained import build_model
from x2vlm.train.rng import rng_state, set_rng_state

log = logging.getLogger("x2vlm")
THUMBNAIL = 128  # largest side of the retrieval thumbnails and keyframes, in pixels


def to_picture(x: torch.Tensor, largest: int | None = None) -> Image.Image:
    """A normalised image tensor [3, H, W] (as the data pipeline makes them) as a picture, at most `largest`
    pixels on its longer side when given."""
    arr = ((x.float() * STD + MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return thumbnail(Image.fromarray(arr), largest)


def thumbnail(img: Image.Image, largest: int | None) -> Image.Image:
    if largest and max(img.size) > largest:
        img = img.copy()
        img.thumbnail((largest, largest))
    return img


class Evaluator:
    def __init__(self, cfg: RunConfig, tokenizer, device: torch.device, final_step: int):
        self.cfg, self.held = cfg, cfg.train.eval
        self.every, self.final = cfg.train.eval_every, final_step
        self.tokenizer, self.device = tokenizer, device
        self.out = Path(cfg.train.out_dir)
        self.size = cfg.model.vision.image_size
        self.tokenize = make_tokenize(tokenizer, cfg.model.text.max_len)
        self.model = None  # the main rank's float32 copy, made at the first evaluation
        self.data: dict = {}
        self.written: set = set()  # media files already written
        if distributed.is_main():
            self.data = self.load()

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.final)

    # --- held-out data (main rank, once) -----------------------------------------------------------------------
    def load(self) -> dict:
        h, data = self.held, {}
        if h.images:
            images, captions, instances, _ = load_captioned_pool(h.images, self.size, h.limit)
            texts = [c for caps in captions for c in caps]
            data["images"] = {"images": images, "texts": texts, "instances": instances,
                              "text_item": torch.tensor([i for i, caps in enumerate(captions) for _ in caps])}
        if h.regions:
            data["regions"] = load_grounding(h.regions, self.size, h.min_regions, h.limit)
        if h.videos:
            videos, mask, captions = load_video_pool(h.videos, self.size, h.fps, h.max_frames, limit=h.limit)
            data["videos"] = {"videos": videos, "mask": mask, "texts": captions}
        if h.videoqa:
            data["videoqa"] = nonempty(list(islice(clips(h.videoqa, h.fps, h.max_frames, needs="qa"), h.limit)),
                                       "questions on usable clips", h.videoqa)
            path = self.cfg.model.qa_vocab
            data["answers"] = read_answer_vocab(path, self.cfg.model.qa_answers) if path else None
        sizes = {"images": len(data.get("images", {}).get("images", [])), "grounding images":
                 len(data.get("regions", [])), "clips": len(data.get("videos", {}).get("videos", [])),
                 "QA clips": len(data.get("videoqa", []))}
        log.info("held-out evaluation every %d steps on %s", self.every,
                 ", ".join(f"{n} {what}" for what, n in sizes.items() if n) or "nothing")
        return data

    # --- evaluation ----------------------------------------------------------------------------------------------
    def run(self, live: torch.nn.Module, step: int) -> dict | None:
        """The held-out results at `step` on the main rank (None on the others). A collective: every rank calls
        it at the steps where `due` holds."""
        state = rng_state()
        try:
            with distributed.full_parameters(live):
                if distributed.is_main():
                    self.copy_weights(live)
            result = self.evaluate(step) if distributed.is_main() else None
        finally:
            set_rng_state(state)
        distributed.barrier()
        return result

    @torch.no_grad()
    def copy_weights(self, live: torch.nn.Module) -> None:
        if self.model is None:
            self.model = build_model(self.cfg, self.tokenizer).to(self.device).float().eval()
        own = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        live_tensors = {**dict(live.named_parameters()), **dict(live.named_buffers())}
        if own.keys() != live_tensors.keys():  # the copy would evaluate a partly untrained model
            odd = sorted(own.keys() ^ live_tensors.keys())
            raise RuntimeError(f"the evaluation model and the trained one differ in {len(odd)} tensor name(s), "
                               f"e.g. {odd[:3]}")
        for name, tensor in live_tensors.items():
            own[name].copy_(tensor.detach())

    def evaluate(self, step: int) -> dict:
        h, d, m = self.held, self.data, self.model
        k, out = h.examples, {"step": step}
        if "images" in d:
            p = d["images"]
            ids, atts = self.tokenize(p["texts"])
            r = evaluate_retrieval(m, p["images"], ids, atts, h.rerank_k, text_item=p["text_item"],
                                   instances=p["instances"], examples=k)
            self.describe_retrieval(r, p["texts"], p["text_item"], lambda i: p["images"][i], "images")
            out["image_retrieval"] = {**r, "protocol": self.protocol(
                h.images, step, image_size=self.size, rerank_k=h.rerank_k, n_queries=len(p["texts"]),
                pool_size=len(p["images"]))}
        if "regions" in d:
            g = evaluate_grounding(m, d["regions"], self.tokenize, self.size, examples=k)
            for e in g.get("examples", []):
                image = d["regions"][e["image"]][0]
                e["file"] = self.picture(f"grounding/{e['image']}.png", lambda x=image: to_picture(x))
            out["grounding"] = {**g, "protocol": self.protocol(h.regions, step, image_size=self.size, iou=0.5,
                                                               min_shapes=h.min_regions, n_images=len(d["regions"]))}
        sampling = {"image_size": self.size, "fps": h.fps, "max_frames": h.max_frames,
                    "aggregator": self.cfg.model.video.aggregator, "seek": "exact"}
        if "videos" in d:
            v = d["videos"]
            ids, atts = self.tokenize(v["texts"])
            r = evaluate_retrieval(m, v["videos"], ids, atts, h.rerank_k, frame_mask=v["mask"], examples=k)
            self.describe_retrieval(r, v["texts"], torch.arange(len(v["texts"])),
                                    lambda i: keyframe(v["videos"][i], v["mask"][i]), "clips")
            out["video_retrieval"] = {**r, "protocol": self.protocol(
                h.videos, step, **sampling, rerank_k=h.rerank_k, n_queries=len(v["texts"]),
                pool_size=len(v["videos"]))}
            out["video_direction"] = {**direction_probe(m, v["videos"], v["mask"], v["texts"], self.tokenize),
                                      "protocol": self.protocol(h.videos, step, **sampling)}
        if "videoqa" in d:
            q = evaluate_videoqa(m, iter(d["videoqa"]), self.tokenize, self.size, examples=k)
            answers = d["answers"]
            for e in q.get("examples", []):
                frames = d["videoqa"][e["clip"]]["frames"]
                e["file"] = self.picture(f"qa/{e['clip']}.png",
                                         lambda f=frames: thumbnail(Image.fromarray(f[len(f) // 2]), THUMBNAIL))
                if answers:
                    e["answer"] = answers[e["label"]] if e["label"] >= 0 else "(outside the vocabulary)"
                    e["predicted"] = answers[e["pred"]]
            out["video_qa"] = {**q, "protocol": self.protocol(h.videoqa, step, **sampling,
                                                              n_questions=q.get("n", 0), n_clips=q.get("clips", 0))}
        return out

    def describe_retrieval(self, result: dict, texts: list, text_item: torch.Tensor, picture, kind: str) -> None:
        """Give a retrieval result's examples their query texts and thumbnails of their items."""
        for e in result.get("examples", []):
            e["text"] = texts[e["query"]]
            e["item"] = int(text_item[e["query"]])
            e["files"] = {str(i): self.picture(f"{kind}/{i}.png", lambda i=i: to_picture(picture(i), THUMBNAIL))
                          for i in {*e["top"], *e["answers"]}}

    def picture(self, name: str, make) -> str:
        """The path (relative to OUT) of media/NAME, written by `make()` the first time it is asked for."""
        rel = f"media/{name}"
        if rel not in self.written:
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            make().save(path)
            self.written.add(rel)
        return rel

    @staticmethod
    def protocol(shards, step: int, **settings) -> dict:
        """What the numbers depend on, as `x2vlm evaluate` records it, with the live weights' step in place of
        an export's hash."""
        out = protocol("", shards, **settings)
        del out["checkpoint_sha256"]
        return {"weights": f"live, step {step}", **out}


def keyframe(clip: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """The middle real frame [3, H, W] of a clip [F, 3, H, W]."""
    real = clip[frame_mask]
    return real[len(real) // 2]
