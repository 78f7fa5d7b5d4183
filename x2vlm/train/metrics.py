"""Metric sinks for the main rank: a console progress bar, JSONL files and wandb (offline by default).

    OUT/metrics.jsonl   one record per logged step (x2vlm.train.telemetry says what it holds)
    OUT/eval.jsonl      one record per held-out evaluation (x2vlm.train.evaluator): numbers, protocols, examples
    OUT/media/          the examples' pictures, referred to by path from eval.jsonl

wandb gets the same numbers (evaluation numbers under "eval/..."), grounding pictures with their true and predicted
boxes, and tables of retrieval queries with their top 5 and of video QA answers.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("x2vlm")
METRICS, EVALS, MEDIA = "metrics.jsonl", "eval.jsonl", "media"
NOT_NUMBERS = ("protocol", "examples")  # parts of an evaluation record that are not curves


class Metrics:
    """Receives one dict of numbers per step and sends it to every sink. Only rank 0 makes one."""

    def __init__(self, out_dir: str, total_steps: int, config: dict, wandb_mode: str = "offline",
                 wandb_project: str = "x2vlm", start_step: int = 0, console: bool = True):
        from tqdm import tqdm

        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / METRICS, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, file=sys.stdout, dynamic_ncols=True,
                        disable=not console, mininterval=2.0)
        self.wandb = None
        if wandb_mode != "disabled":
            self.wandb = _start_wandb(out_dir, config, wandb_mode, wandb_project)

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        shown = {k: record[k] for k in ("loss", "lr", "samples_per_s", "mfu_pct", "data_load_pct") if k in record}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.n = step
        self.bar.refresh()
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def log_eval(self, step: int, record: dict) -> None:
        """A held-out evaluation's record (numbers, protocols, examples with pictures under OUT)."""
        with open(self.out / EVALS, "a") as f:
            f.write(json.dumps(record) + "\n")
        scores = evaluation_numbers(record)
        log.info(f"held-out evaluation at step {step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in scores.items() if k in HEADLINE or k.endswith("/mean_acc")))
        if self.wandb is not None:
            try:
                self.wandb.log({**{f"eval/{k}": v for k, v in scores.items()}, **self.wandb_media(record)},
                               step=step)
            except Exception as e:  # a dashboard must never stop training
                log.warning(f"wandb could not log the evaluation ({type(e).__name__}: {e})")

    def wandb_media(self, record: dict) -> dict:
        """Grounding pictures with boxes, and tables of retrieval and video QA examples."""
        import wandb

        def image(rel: str, **kw):
            return wandb.Image(str(self.out / rel), **kw)

        out = {}
        g = record.get("grounding", {})
        if g.get("examples"):
            out["eval/grounding/examples"] = [image(e["file"], boxes=wandb_boxes(e), caption="; ".join(
                f"{p} (IoU {u:.2f})" for p, u in zip(e["phrases"], e["iou"]))) for e in g["examples"]]
        for task in ("image_retrieval", "video_retrieval"):
            examples = record.get(task, {}).get("examples")
            if examples:
                cols = ["query", "right answer", "rank (ITC)", "rank (ITM re-rank)", *(f"top {i}" for i in range(1, 6))]
                rows = [[e["text"], image(e["files"][str(e["item"])]), e["rank"] + 1, e["rank_itm"] + 1,
                         *(image(e["files"][str(i)], caption=f"{s:.3f}") for i, s in zip(e["top"], e["scores"]))]
                        for e in examples]
                out[f"eval/{task}/examples"] = wandb.Table(columns=cols, data=[r + [None] * (len(cols) - len(r))
                                                                               for r in rows])
        qa = record.get("video_qa", {})
        if qa.get("by_type"):
            aggregator = qa.get("protocol", {}).get("aggregator", "")
            out["eval/video_qa/by_type"] = wandb.Table(
                columns=["type", "aggregator", "accuracy", "questions", "chance"],
                data=[[t, aggregator, v["acc"], v["n"], v["chance"]] for t, v in qa["by_type"].items()])
        if qa.get("examples"):
            out["eval/video_qa/examples"] = wandb.Table(
                columns=["keyframe", "question", "type", "answer", "predicted", "right"],
                data=[[image(e["file"]), e["question"], e["type"], e.get("answer", e["label"]),
                       e.get("predicted", e["pred"]), e["right"]] for e in qa["examples"]])
        return out

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = _plain(v)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


# the evaluation numbers the console shows (and the direction probe's mean accuracies)
HEADLINE = {"image_retrieval/t2i_r1", "video_retrieval/t2v_r1", "grounding/acc_iou50", "video_qa/acc"}


def evaluation_numbers(record: dict, prefix: str = "") -> dict:
    """The numbers of an evaluation record as flat "task/name" keys (protocols and examples left out)."""
    out = {}
    for k, v in record.items():
        if k in NOT_NUMBERS or k == "step":
            continue
        if isinstance(v, dict):
            out.update(evaluation_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def wandb_boxes(example: dict) -> dict:
    """wandb's box overlay of a grounding example: true boxes and predicted boxes (pixels), each with its phrase."""
    def boxes(key: str, class_id: int) -> list:
        return [{"position": {"minX": x, "minY": y, "maxX": x + w, "maxY": y + h}, "domain": "pixel",
                 "class_id": class_id, "box_caption": phrase}
                for phrase, (x, y, w, h) in zip(example["phrases"], example[key])]
    labels = {0: "true", 1: "predicted"}
    return {"truth": {"box_data": boxes("truth", 0), "class_labels": labels},
            "prediction": {"box_data": boxes("pred", 1), "class_labels": labels}}


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _start_wandb(out_dir: str, config: dict, mode: str, project: str):
    """wandb in the requested mode. Online without credentials falls back to offline instead of hanging."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to console and JSONL only")
        return None
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        log.warning("wandb online mode has no credentials here; logging offline instead")
        mode = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(project=project, dir=out_dir, config=config, mode=mode,
                          settings=wandb.Settings(init_timeout=60))
    except Exception as e:  # a dashboard must never stop training
        log.warning(f"wandb could not start ({type(e).__name__}: {e}); continuing without it")
        return None
