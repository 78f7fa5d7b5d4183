"""The README's data section, run as written: small data sets written in every published format the section
names (broken entries in each), every `x2vlm make-shards` command of the section run on them, then its `x2vlm
pretrain` (a few steps of the tiny model, as one process) on the converted shards and on img2dataset /
video2dataset output as it is, and its `x2vlm evaluate` (retrieval over all captions, grounding, video
retrieval). The README's large pre-training example is checked for its overrides (it needs GPUs and hours)."""
import base64
import contextlib
import csv
import io
import json
import math
import os
import pickle
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand

from video.encode import encode_video
from x2vlm.cli import FORMATS, main
from x2vlm.config import load_config
from x2vlm.data.samples import encode_image
from x2vlm.data.shards import expand_shards
from x2vlm.data.tokenizer import train_tokenizer
from x2vlm.demo.shapesworld import generate

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section_commands(heading: str) -> list:
    """The command lines of the first bash block after a README heading (continuations joined, comments out)."""
    text = README.split(heading, 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    return [" ".join(ln.split()) for ln in lines]


COMMANDS = section_commands("## Bringing your data")


def jpeg_of(sample) -> bytes:
    return encode_image(sample["image"])


def save(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (bytes, bytearray)):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))


def clip_bytes(value: int, n: int = 6) -> bytes:
    frames = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    frames[..., value % 3] = 60 + 30 * np.arange(n)[:, None, None]
    return encode_video(frames, fps=2)


def tar_of(path: Path, members: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_data_sets(root: Path, s: list) -> list:
    """Every input the README's commands name, in its published layout; returns the texts (for a tokenizer)."""
    # COCO: official captions file, Karpathy's dataset_coco.json
    val = s[:8]
    for i, x in enumerate(val):
        save(root / "coco" / "val2014" / f"COCO_val2014_{i:012d}.jpg", jpeg_of(x))
    save(root / "coco" / "annotations" / "captions_val2014.json", {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 64}
                   for i in range(9)],  # image 8 has no file
        "annotations": [{"image_id": i, "id": 2 * i + k, "caption": c}
                        for i, x in enumerate(val) for k, c in enumerate([x["caption"], x["regions"][0]["phrase"]])]
        + [{"image_id": 8, "id": 99, "caption": "no file"}, {"image_id": 3, "id": 98, "caption": " "}]})
    save(root / "coco" / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
         "split": "test" if i < 6 else "train",
         "sentences": [{"raw": x["caption"]}, {"raw": x["regions"][0]["phrase"]}]}
        for i, x in enumerate(val)] + [{"filepath": "val2014", "split": "test"}]})
    # Visual Genome
    vg = s[8:14]
    for i, x in enumerate(vg, 1):
        save(root / "vg" / "VG_100K" / f"{i}.jpg", jpeg_of(x))
    save(root / "vg" / "region_descriptions.json", [
        {"id": i, "regions": [{"region_id": 10 * i + k, "image_id": i, "x": r["box"][0], "y": r["box"][1],
                               "width": r["box"][2], "height": r["box"][3], "phrase": r["phrase"]}
                              for k, r in enumerate(x["regions"])]} for i, x in enumerate(vg, 1)]
        + [{"id": 77, "regions": [{"x": 0, "y": 0, "width": 5, "height": 5, "phrase": "no image file"}]}])
    save(root / "vg" / "image_data.json", [{"image_id": i, "width": 64, "height": 64,
                                            "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{i}.jpg"}
                                           for i in range(1, 7)])
    # RefCOCO+: a pickle of refs and COCO instances; images under coco/train2014
    ref_imgs = s[14:20]
    refs, anns = [], []
    for i, x in enumerate(ref_imgs, 1):
        save(root / "coco" / "train2014" / f"COCO_train2014_{i:012d}.jpg", jpeg_of(x))
        for k, r in enumerate(x["regions"]):
            ann_id = 100 * i + k
            anns.append({"id": ann_id, "image_id": i, "bbox": r["box"], "category_id": 1})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "split": "testA" if i % 2 else "train",
                         "sentences": [{"sent": r["phrase"], "raw": r["phrase"], "sent_id": ann_id}]})
    refs.append({"ref_id": 1, "ann_id": 9999, "image_id": 1, "split": "testA", "sentences": []})
    save(root / "refcoco+" / "refs(unc).p", pickle.dumps(refs, protocol=2))
    save(root / "refcoco+" / "instances.json", {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg",
                                                           "width": 64, "height": 64} for i in range(1, 7)],
                                                "annotations": anns, "categories": [{"id": 1, "name": "shape"}]})
    # X-VLM JSON lines: base64 image-text lines in a folder, region lines by path, video-text lines
    lines = [{"binary": base64.b64encode(jpeg_of(x)).decode(), "desc": [x["caption"], "a picture"]}
             for x in s[20:26]] + [{"binary": "@@", "desc": "bad"}]
    save(root / "xvlm" / "cc3m" / "part-000.jsonl", "\n".join(json.dumps(e) for e in lines))
    for i, x in enumerate(s[26:30]):
        save(root / "xvlm" / "images" / f"r{i}.jpg", jpeg_of(x))
    save(root / "xvlm" / "vg_region.jsonl", "\n".join(json.dumps(
        {"image_rpath": f"r{i}.jpg", "elems": [{"caption": r["phrase"], "bb": r["box"], "attributes": "small"}
                                               for r in x["regions"]]}) for i, x in enumerate(s[26:30])))
    frames = lambda x: [base64.b64encode(jpeg_of(x)).decode()] * 3  # noqa: E731
    save(root / "xvlm" / "webvid.jsonl", "\n".join(json.dumps(e) for e in [
        {"video_frames": frames(s[30]), "text": s[30]["caption"]},
        {"video_frames": [frames(s[31]), frames(s[32])], "is_continuous": True, "text": [s[31]["caption"], "[Music]"]},
        {"video_frames": ["@@"], "text": "bad frames"}]))
    # CSV / TSV: CC3M style (no header), WebVid style (a template, videos)
    for i, x in enumerate(s[33:37]):
        save(root / "cc3m" / "images" / f"{i}.jpg", jpeg_of(x))
    save(root / "cc3m" / "train.tsv", "".join(f"{x['caption']}\t{i}.jpg\n" for i, x in enumerate(s[33:37]))
         + "orphan caption\tmissing.jpg\n")
    webvid = [(1000 + i, x["caption"]) for i, x in enumerate(s[37:41])]
    for vid, _ in webvid[:3]:
        save(root / "webvid" / "videos" / "0042" / f"{vid}.mp4", clip_bytes(vid))
    with open(root / "webvid" / "results_2M_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for vid, cap in webvid:
            w.writerow([vid, f"https://example.invalid/{vid}.mp4", "PT00H00M03S", "0042", cap])
    # MSRVTT: official JSON, the 9k list, the 1k-A test CSV
    for i in range(8):
        save(root / "msrvtt" / "videos" / f"video{i}.mp4", clip_bytes(i))
    save(root / "msrvtt" / "videos" / "video8.mp4", b"broken")
    save(root / "msrvtt" / "train_val_videodatainfo.json", {
        "videos": [{"video_id": f"video{i}", "split": "train" if i < 6 else "validate", "id": i} for i in range(9)],
        "sentences": [{"video_id": f"video{i}", "caption": s[41 + i]["caption"], "sen_id": i} for i in range(9)]})
    save(root / "msrvtt" / "MSRVTT_train.9k.csv", "video_id\n" + "".join(f"video{i}\n" for i in (0, 1, 2, 3, 8)))
    with open(root / "msrvtt" / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "key", "vid_key", "video_id", "sentence"])
        for i in (4, 5, 6, 7, 9):
            w.writerow([i, f"ret{i}", f"msr{i}", f"video{i}", s[41 + i]["caption"]])
    # MSVD-QA with its mapping
    for i in range(3):
        save(root / "msvd" / "YouTubeClips" / f"clip{i}_0_5.avi", clip_bytes(i))
    save(root / "msvd" / "youtube_mapping.txt", "".join(f"clip{i}_0_5 vid{i + 1}\n" for i in range(4)))
    save(root / "msvd" / "train_qa.json", [{"video_id": v, "question": q, "answer": a, "id": n} for n, (v, q, a) in
                                          enumerate([(1, "what moves?", "square"), (2, "what colour?", "red"),
                                                     (3, "what moves?", "circle"), (4, "gone?", "yes"),
                                                     (9, "unmapped?", "no")])])
    # the project's own format
    for i, x in enumerate(s[50:54]):
        save(root / "mine" / "images" / f"m{i}.jpg", jpeg_of(x))
    save(root / "mine" / "train.jsonl", "\n".join(json.dumps({"image": f"m{i}.jpg", "caption": x["caption"],
                                                              "regions": x["regions"]})
                                                  for i, x in enumerate(s[50:54])) + "\n{\"caption\": \"no image\"}")
    # img2dataset and video2dataset output, used as it is
    laion = []
    for i, x in enumerate(s[54:60]):
        key = f"{i:09d}"
        laion += [(f"{key}.jpg", jpeg_of(x)), (f"{key}.txt", x["caption"].encode()),
                  (f"{key}.json", json.dumps({"url": "https://example.invalid", "caption": x["caption"], "key": key,
                                              "status": "success", "error_message": None, "width": 64,
                                              "height": 64}).encode())]
    tar_of(root / "laion" / "00000.tar", laion[:9])
    tar_of(root / "laion" / "00001.tar", laion[9:])
    v2d = []
    for i, x in enumerate(s[60:64]):
        key = f"{i:09d}_0"
        v2d += [(f"{key}.mp4", clip_bytes(i)), (f"{key}.txt", x["caption"].encode()),
                (f"{key}.json", json.dumps({"videoid": str(i), "duration": "PT00H00M03S", "caption": x["caption"],
                                            "key": key, "status": "success"}).encode())]
    v2d += [("000000009.txt", b"failed"), ("000000009.json", b'{"status": "failed_to_download", "key": "000000009"}')]
    tar_of(root / "webvid-v2d" / "00000.tar", v2d)
    return [x["caption"] for x in s] + [r["phrase"] for x in s for r in x["regions"]] + [
        "what moves?", "what colour?", "a picture", "small"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    samples = generate("train", 64, seed=3, image_size=64)
    texts = write_data_sets(root, samples)
    train_tokenizer(texts, str(root / "tokenizer"))
    outputs = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for cmd in COMMANDS:
            argv = shlex.split(cmd)
            if argv[:2] != ["x2vlm", "make-shards"]:
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = main(argv[1:] + ["--processes", "2"])
            outputs[cmd] = (rc, out.getvalue())
    finally:
        os.chdir(cwd)
    return root, outputs


def test_every_format_has_a_command_and_each_runs(converted):
    root, outputs = converted
    formats = {shlex.split(c)[shlex.split(c).index("--format") + 1] for c in outputs}
    assert formats == set(FORMATS)
    for cmd, (rc, printed) in outputs.items():
        assert rc == 0 and re.search(r"wrote [1-9]\d* shard", printed), (cmd, printed)
    skipped = "".join(printed for _, printed in outputs.values())
    for reason in ("missing_image", "bad_base64", "bad_frames", "unknown_annotation", "missing_video",
                   "unreadable_video", "unmapped_video", "no_image_field"):
        assert f": {reason}" in skipped, reason
    coco = [p for c, (_, p) in outputs.items() if "captions_val2014" in c][0]
    assert "8 usable images" in coco


def run_shell(root: Path, cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A README command in bash (globs expand as in a shell), `x2vlm` being this checkout's command line."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "x2vlm").write_text(f"#!/bin/sh\nexec {sys.executable} -m x2vlm \"$@\"\n")
    (bin_dir / "x2vlm").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               WANDB_MODE="disabled", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    from x2vlm.distributed import free_port

    env["MASTER_PORT"] = str(free_port())
    return subprocess.run(["bash", "-c", cmd], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_converted_shards_train_and_evaluate(converted):
    root, outputs = converted
    assert all(rc == 0 for rc, _ in outputs.values())
    train = next(c for c in COMMANDS if c.startswith("x2vlm pretrain"))
    evaluate = next(c for c in COMMANDS if c.startswith("x2vlm evaluate"))
    p = run_shell(root, f"{train} train.sample_log=true")  # (the keys of every step, to check below)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert {"images/itc", "regions/itc", "videos/itc"} <= set(rows[-1])
    assert rows[-1].get("skipped/failed_download", 0) >= 1  # the video2dataset failure record, counted
    used = {}
    for line in (root / "runs" / "mine" / "samples" / "rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        used.setdefault(r["source"], set()).update(r["keys"])
    # every set of shards that the command names was read: COCO, img2dataset, CC3M, own format; VG, X-VLM
    # regions; MSRVTT, WebVid (CSV), X-VLM frames, video2dataset
    keys = {source: {re.sub(r"\d", "#", k) for k in ks} for source, ks in used.items()}
    assert {"COCO_val####_############", "#########", "#", "m#"} <= keys["images"], keys["images"]
    assert {"vg_#", "r#"} <= keys["regions"], keys["regions"]
    assert {"video#", "####_####", "webvid_#########", "#########_#"} <= keys["videos"], keys["videos"]
    p = run_shell(root, evaluate)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((root / "runs" / "mine" / "eval.json").read_text())
    ret = result["image_retrieval"]
    assert ret["pool_size"] == 6 and ret["n_texts"] == 12 and ret["protocol"]["n_queries"] == 12
    assert 0 <= ret["t2i_r1"] <= ret["t2i_r5"] <= 1 and 0 <= ret["i2t_r1"] <= 1
    assert result["grounding"]["n"] >= 3 and result["video_retrieval"]["pool_size"] == 4


def test_the_large_pretraining_example_reads_its_shard_lists():
    line = next(c for c in section_commands("## Using it") if "--config base" in c)
    overrides = [a for a in shlex.split(line) if "=" in a and not a.startswith("-")]
    cfg = load_config("base", overrides)
    assert cfg.data.sources[0].shards == ["shards/coco-{000..099}.tar"]
    assert cfg.data.sources[1].shards == ["shards/vg-*.tar"]
    assert len(list(braceexpand(cfg.data.sources[0].shards[0]))) == 100
    with pytest.raises(FileNotFoundError, match="shards/coco-000.tar"):
        expand_shards(cfg.data.sources[0].shards)
