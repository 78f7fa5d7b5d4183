"""`x2vlm demo`: the whole system on a CPU in minutes.

Generates ShapesWorld data, trains a WordPiece tokenizer on it, writes WebDataset shards, pre-trains the tiny
preset with 2 ranks under the deepspeed launcher (ZeRO-2; bf16 where the hardware supports it), evaluates
retrieval and grounding on held-out images (and video retrieval on held-out clips when the preset has a video
stage) and writes `OUT/results.json`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from x2vlm.config import load_config, save_config


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def prepare_data(out: Path, n_train: int, n_heldout: int, seed: int, image_size: int, shards_per_source: int,
                 n_train_clips: int = 0, n_heldout_clips: int = 0):
    """ShapesWorld train and held-out splits as shards (images, and video clips when asked), and a tokenizer
    trained on the training texts."""
    from x2vlm.data.shapesworld import corpus, generate
    from x2vlm.data.shards import write_shards
    from x2vlm.data.tokenizer import train_tokenizer

    data = out / "data"
    train = generate("train", n_train, seed=seed, image_size=image_size)
    heldout = generate("heldout", n_heldout, seed=seed + 1, image_size=image_size)
    texts = corpus(train)
    per = -(-n_train // shards_per_source)
    paths = {
        # One set of training images serves both sources: as captioned images, and with their regions.
        "train": write_shards(train, str(data), "train", per),
        "heldout": write_shards(heldout, str(data), "heldout", n_heldout),
    }
    unseen = sum(bool(s.get("unseen")) for s in heldout)
    _say(f"{n_train} training and {n_heldout} held-out images ({unseen} held-out images show a colour-shape "
         f"pair never seen in training); {len(paths['train'])} training shards")
    if n_train_clips:
        from video.shards import write_video_shards
        from x2vlm.data.shapesworld_video import generate_clips, shard_samples, video_corpus

        clips = generate_clips("train", n_train_clips, seed=seed, size=image_size)
        held = generate_clips("heldout", n_heldout_clips, seed=seed + 1, size=image_size)
        texts += video_corpus(clips)
        paths["train_video"] = write_video_shards(shard_samples(clips), str(data), "train-video",
                                                  -(-n_train_clips // shards_per_source))
        paths["heldout_video"] = write_video_shards(shard_samples(held), str(data), "heldout-video",
                                                    max(1, n_heldout_clips))
        _say(f"{n_train_clips} training and {n_heldout_clips} held-out video clips (mp4, "
             f"{len(paths['train_video'])} training shards)")
    train_tokenizer(texts, str(out / "tokenizer"))
    return paths


def launch_pretrain(config_path: Path, ranks: int, log_path: Path) -> None:
    from x2vlm.train.distributed import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), "--module", "x2vlm", "pretrain", "--config", str(config_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    _say("launching: deepspeed --num_gpus %d --module x2vlm pretrain --config %s" % (ranks, config_path))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("[x2vlm]", "[rank0]:[x2vlm]")) or "Traceback" in line or "Error" in line:
                print(line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(open(log_path).readlines()[-25:])
        raise RuntimeError(f"pre-training failed with exit code {code}; the end of {log_path}:\n{tail}")


def summary_table(results: dict) -> str:
    r, g = results["image_retrieval"], results["grounding"]
    chance = 1.0 / r["pool_size"]
    rr = r["itm_rerank"]
    rows = [
        ("retrieval, pool of %d" % r["pool_size"], "model", "chance"),
        ("text->image R@1  (ITC)", f"{r['t2i_r1']:.3f}", f"{chance:.3f}"),
        ("text->image R@5  (ITC)", f"{r['t2i_r5']:.3f}", f"{5 * chance:.3f}"),
        ("image->text R@1  (ITC)", f"{r['i2t_r1']:.3f}", f"{chance:.3f}"),
        ("text->image R@1  (ITM re-rank top %d)" % rr["k"], f"{rr['t2i_r1']:.3f}", f"{chance:.3f}"),
        ("image->text R@1  (ITM re-rank top %d)" % rr["k"], f"{rr['i2t_r1']:.3f}", f"{chance:.3f}"),
        ("grounding, %d phrases" % g["n"], "model", "random shape"),
        ("accuracy at IoU 0.5", f"{g['acc_iou50']:.3f}", f"{g['random_shape_baseline_acc_iou50']:.3f}"),
        ("mean IoU", f"{g['mean_iou']:.3f}", ""),
        ("right shape picked", f"{g['right_shape']:.3f}", ""),
    ]
    if "video_retrieval" in results:
        v = results["video_retrieval"]
        c = 1.0 / v["pool_size"]
        rows += [("video retrieval, pool of %d clips (zero-shot)" % v["pool_size"], "model", "chance"),
                 ("text->video R@1  (ITC)", f"{v['t2v_r1']:.3f}", f"{c:.3f}"),
                 ("text->video R@5  (ITC)", f"{v['t2v_r5']:.3f}", f"{5 * c:.3f}"),
                 ("video->text R@1  (ITC)", f"{v['v2t_r1']:.3f}", f"{c:.3f}")]
    for name, d in results.get("video_direction", {}).items():
        if d.get("n"):
            rows.append((f"direction of motion, {name} pooling ({d['n']} clips, fwd+rev)", f"{d['mean_acc']:.3f}",
                         f"{d['chance']:.3f}"))
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{w}}  {b:>8}  {c:>12}" for a, b, c in rows)


def run_demo(out: str = "runs/demo", ranks: int = 2, overrides: list[str] | None = None, n_train: int = 6000,
             n_heldout: int = 300, seed: int = 0, n_train_clips: int = 1200, n_heldout_clips: int = 200) -> dict:
    from x2vlm.eval.run import evaluate_checkpoint

    start = time.time()
    outp = Path(out).resolve()
    outp.mkdir(parents=True, exist_ok=True)
    base = load_config("tiny", overrides, check_paths=False)
    video = [s for s in base.data.sources if s.kind == "video"]
    paths = prepare_data(outp, n_train, n_heldout, seed, base.model.vision.image_size,
                         shards_per_source=max(4, 2 * ranks), n_train_clips=n_train_clips if video else 0,
                         n_heldout_clips=n_heldout_clips if video else 0)
    shards = {"image": paths["train"], "region": paths["train"], "video": paths.get("train_video")}
    cfg = load_config("tiny", [
        *(f"data.sources.{i}.shards=[{','.join(shards[s.kind])}]" for i, s in enumerate(base.data.sources)),
        f"model.text.tokenizer={outp / 'tokenizer'}", f"train.out_dir={outp / 'run'}",
        f"train.seed={seed}", *(overrides or [])])
    save_config(cfg, outp / "config.yaml")
    _say(f"data ready in {time.time() - start:.0f}s; pre-training {cfg.train.steps} steps")
    launch_pretrain(outp / "config.yaml", ranks, outp / "pretrain.log")
    _say(f"pre-training done at {time.time() - start:.0f}s; evaluating on held-out images")
    results = evaluate_checkpoint(str(outp / "run"), image_shards=paths["heldout"], region_shards=paths["heldout"],
                                  video_shards=paths.get("heldout_video", ()),
                                  fps=video[0].fps if video else 1.0, max_frames=video[0].max_frames if video else 8)
    results["wall_seconds"] = round(time.time() - start, 1)
    (outp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary_table(results), flush=True)
    _say(f"results in {outp / 'results.json'} ({results['wall_seconds']:.0f}s in all)")
    return results
