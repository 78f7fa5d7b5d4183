"""The inference API on a checkpoint of the demo's kind (the tiny preset pre-trained briefly on ShapesWorld, then
fine-tuned for video QA): `rank` gives `x2vlm evaluate`'s retrieval numbers on the same export and shards,
`ground` its boxes and grounding numbers, `answer` its video QA predictions from the export's own vocabulary
(also after the export moved); the README's inference example runs as written."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import x2vlm
from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    p = subprocess.run([sys.executable, "-m", "x2vlm", *map(str, args)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """ShapesWorld data, `x2vlm pretrain` of the tiny preset for 24 steps (one process), then `x2vlm finetune
    --task video_qa` for 6 steps from it."""
    out = tmp_path_factory.mktemp("demo_ckpt")
    paths = prepare_data(out, n_train=240, n_heldout=48, seed=2, image_size=64, shards_per_source=2,
                         n_train_clips=16, n_heldout_clips=6)
    common = {"train.precision": "fp32", "train.wandb_mode": "disabled", "data.num_workers": 1,
              "model.text.tokenizer": str(out / "tokenizer"), "train.warmup_steps": 4}
    pre = update(load_config("tiny"), {**common, "train.stages": [], "train.steps": 24, "train.save_every": 24,
                                       "train.out_dir": str(out / "pre"), "data.sources": [
                                           SourceConfig(name="images", kind="image", shards=paths["train"],
                                                        batch_size=16),
                                           SourceConfig(name="regions", kind="region", shards=paths["train"],
                                                        batch_size=8, max_texts=4, with_caption=False)]})
    save_config(pre, out / "pre.yaml")
    _run("pretrain", "--config", out / "pre.yaml")
    qa = update(pre, {**common, "train.steps": 6, "train.save_every": 6, "train.out_dir": str(out / "qa"),
                      "model.qa_answers": paths["answers"], "data.sources": [
                          SourceConfig(name="qa", kind="video_qa", shards=paths["video_qa_train"], batch_size=8,
                                       max_frames=8)]})
    save_config(qa, out / "qa.yaml")
    log = _run("finetune", "--task", "video_qa", "--config", out / "qa.yaml", "--checkpoint", out / "pre")
    return out, paths, log


def test_rank_reproduces_the_evaluation_s_retrieval_numbers(demo):
    from x2vlm.data.pipeline import iterate_samples
    from x2vlm.eval.ranking import gt_ranks, recall
    from x2vlm.eval.run import evaluate_checkpoint

    out, paths, _ = demo
    result = evaluate_checkpoint(str(out / "pre"), image_shards=paths["heldout"], rerank_k=16)["image_retrieval"]
    samples = list(iterate_samples(paths["heldout"]))
    images, captions = [s["image"] for s in samples], [s["json"]["caption"] for s in samples]
    m = x2vlm.load(out / "pre")
    gt = torch.arange(len(captions))
    for rerank, expected in ((0, result), (16, result["itm_rerank"])):
        r = m.rank(captions, images, rerank=rerank)
        got = {f"t2i_{k}": v for k, v in recall(gt_ranks(r["t2i"], gt)).items()}
        got.update({f"i2t_{k}": v for k, v in recall(gt_ranks(r["i2t"], gt)).items()})
        assert got == {k: expected[k] for k in got}, (rerank, got, expected)
    assert result["pool_size"] == len(images) == 48


def test_ground_gives_the_evaluation_s_boxes_and_numbers(demo):
    from x2vlm.boxes import cxcywh_to_xywh
    from x2vlm.data.pipeline import iterate_samples
    from x2vlm.eval.grounding import iou_xywh
    from x2vlm.eval.run import evaluate_checkpoint, load_grounding, make_tokenize
    from x2vlm.pretrained import load_pretrained

    out, paths, _ = demo
    result = evaluate_checkpoint(str(out / "pre"), region_shards=paths["heldout"])["grounding"]
    model, tok, cfg = load_pretrained(out / "pre")
    tokenize, size = make_tokenize(tok, cfg.model.text.max_len), cfg.model.vision.image_size
    m = x2vlm.load(out / "pre")
    held = [s for s in iterate_samples(paths["heldout"]) if len(s["json"].get("regions") or []) >= 2]
    ious = []
    for s, (image, regions) in zip(held, load_grounding(paths["heldout"], size)):
        phrases = [p for p, _ in regions]
        with torch.no_grad():  # the box the evaluation computes
            ids, atts = tokenize(phrases)
            evaluated = cxcywh_to_xywh(model.predict_boxes(model.encode_image(image[None]), ids, atts).float())
        scale = torch.tensor([s["image"].width, s["image"].height] * 2) / size
        boxes = torch.tensor(m.ground(s["image"], phrases))
        assert torch.allclose(boxes, evaluated * size * scale, atol=1e-3)
        ious.append(iou_xywh(boxes, torch.tensor([b for _, b in regions])))
    ious = torch.cat(ious)
    assert len(ious) == result["n"] > 0
    assert float((ious >= 0.5).float().mean()) == pytest.approx(result["acc_iou50"], abs=1e-9)
    assert float(ious.mean()) == pytest.approx(result["mean_iou"], abs=1e-5)


def test_video_qa_export_answers_with_its_vocabulary_after_it_moved(demo, tmp_path):
    from x2vlm.eval.run import clips, evaluate_checkpoint

    out, paths, log = demo
    assert "ans2label.json (model.qa_vocab): exported with the model" in log
    export = out / "qa" / "checkpoints" / "step6"
    vocab = json.loads((Path(paths["video_qa_train"][0]).parent / "ans2label.json").read_text())
    assert json.loads((export / "answers.json").read_text()) == vocab
    moved = shutil.copytree(export, tmp_path / "elsewhere")
    m = x2vlm.load(moved)
    test = list(clips(paths["video_qa_test"], needs="qa"))
    hits = n = 0
    for s in test:
        questions = [q["question"] for q in s["json"]["qa"]]
        answers = m.answer(s["frames"], questions)
        assert all(a in vocab for a in answers)
        hits += sum(a == q["answer"] for a, q in zip(answers, s["json"]["qa"]))
        n += len(questions)
    evaluated = evaluate_checkpoint(str(export), videoqa_shards=paths["video_qa_test"])["video_qa"]
    assert n == evaluated["n"] and hits / n == pytest.approx(evaluated["acc"])
    # from the video file itself: the same frames, the same answers
    first = test[0]
    video = out / "data" / "published" / "videos" / f"{first['json']['video_id']}.mp4"
    questions = [q["question"] for q in first["json"]["qa"]]
    assert m.answer(video, questions) == m.answer(first["frames"], questions)
    assert m.answer(str(video), questions[0]) == m.answer(first["frames"], questions)[0]


def readme_example() -> str:
    """The Python block under the README's "### Inference" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Inference", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_inference_example_runs_as_written(demo, tmp_path):
    from x2vlm.data.pipeline import iterate_samples

    out, paths, _ = demo
    code = readme_example()
    assert 5 <= len(code.strip().splitlines()) <= 12
    names = re.findall(r'"(exports/[^"]+)"', code)
    photos = sorted(set(re.findall(r'"(photos/[^"]+\.jpg)"', code)))
    assert names and photos
    for name in names:
        shutil.copytree(out / "pre" / "checkpoints" / "step24", tmp_path / name, dirs_exist_ok=True)
    (tmp_path / "photos").mkdir()
    for s, photo in zip(iterate_samples(paths["heldout"]), photos):
        s["image"].save(tmp_path / photo)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()


def test_embed_videos_from_a_folder_and_from_shards(demo, tmp_path):
    """`x2vlm embed --videos`: the mp4 files of a folder, and the same clips read from QA shards, give the
    features `encode_videos` gives."""
    import numpy as np

    from x2vlm.data.pipeline import iterate_samples
    from x2vlm.data.samples import ClipDecoder

    out, paths, _ = demo
    folder = out / "data" / "published" / "videos"
    test_ids = [s["json"]["video_id"] for s in iterate_samples(paths["video_qa_test"], ClipDecoder(needs="qa"))]
    _run("embed", "--checkpoint", out / "pre", "--videos", folder, *paths["video_qa_test"], "--out",
         tmp_path / "v.npy", "--batch-size", "4")
    feats, keys = np.load(tmp_path / "v.npy"), (tmp_path / "v.keys.txt").read_text().split()
    files = sorted(folder.glob("*.mp4"))
    assert feats.shape == (len(files) + len(test_ids), 128) and keys[:len(files)] == [f.name for f in files]
    m = x2vlm.load(out / "pre")
    assert np.allclose(feats[:len(files)], m.encode_videos([str(f) for f in files]).numpy(), atol=1e-5)
    from_files = {f.stem: row for f, row in zip(files, feats)}
    assert np.allclose(feats[len(files):], np.stack([from_files[v] for v in test_ids]), atol=1e-5)


def test_the_readme_shape_probe_runs_as_written(demo):
    """`python scripts/probe_shapes.py RUN SHARDS` from the README, on this module's run and held-out shard: it
    probes every shape of every held-out image (counted here from the shard's own annotations), and a missing
    shard is one line of error."""
    from x2vlm.data.pipeline import iterate_samples

    out, paths, _ = demo
    readme = (ROOT / "README.md").read_text()
    args = re.search(r"`python (scripts/probe_shapes\.py runs/demo/run runs/demo/data/heldout-000000\.tar)`",
                     readme.replace("\n", " ")).group(1).split()
    args = [a.replace("runs/demo/run", str(out / "pre")).replace("runs/demo/data/heldout-000000.tar",
                                                                    paths["heldout"][0]) for a in args]
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    shapes = [r["shape"] for s in iterate_samples(paths["heldout"]) for r in s["json"].get("regions") or []]
    assert result["images"] == 48 and result["regions"]["n"] == len(shapes)
    assert result["regions"]["majority"] == pytest.approx(max(map(shapes.count, set(shapes))) / len(shapes))
    assert all(0.0 <= result[part][k]["acc"] <= 1.0 for part, k in (("captions", "shape"), ("captions", "colour")))
    bad = subprocess.run([sys.executable, args[0], str(out / "pre"), str(out / "missing.tar")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: no shard matches " +
                                                                        repr(str(out / "missing.tar"))]
