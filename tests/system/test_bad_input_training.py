"""Training on shards with every kind of damage mixed into good samples (images and videos, a truncated shard and a
shard that disappears after the run started): training proceeds, the bad samples are skipped and counted by kind
in the metrics, and the counts are exact; a run whose bad fraction passes data.max_skip_fraction stops with a
clear message."""
import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import webdataset as wds

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.data.pipeline import build_loader
from x2vlm.data.samples import encode_image
from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer
from x2vlm.demo.shapesworld import generate
from x2vlm.demo.shapesworld_video import generate_clips

SCRIPT = textwrap.dedent("""
    import os
    import sys
    import x2vlm.data.shards as shards
    from x2vlm.config import load_config
    from x2vlm.train.loop import train

    init, vanish = shards.ShardStream.__init__, sys.argv[2]

    def init_then_lose_one(self, *args, **kwargs):  # the shard disappears after the run found it
        init(self, *args, **kwargs)
        if vanish in self.shards and os.path.exists(vanish):
            os.remove(vanish)

    shards.ShardStream.__init__ = init_then_lose_one
    train(load_config(sys.argv[1], sys.argv[3:]))
""")

# Damage per epoch, by kind: what the shards below hold.
IMAGE_DAMAGE = {"bad_image": 1, "missing_caption": 1, "empty_text": 1, "bad_json": 2, "bad_utf8": 1, "bad_box": 2,
                "bad_shard": 2}
VIDEO_DAMAGE = {"video_decode": 2, "missing_video": 1, "bad_json": 1, "empty_text": 1}


def image_shards(root: Path) -> list:
    good = generate("train", 36, seed=11, image_size=64)

    def record(s):
        meta = {"caption": s["caption"], "regions": s["regions"]}
        return {"__key__": s["key"], "jpg": encode_image(s["image"]), "json": json.dumps(meta).encode()}

    img = encode_image(good[0]["image"])
    bad = [
        {"__key__": "garbage", "jpg": b"not an image", "json": b'{"caption": "a red square"}'},
        {"__key__": "nocaption", "jpg": img, "json": b'{"regions": []}'},
        {"__key__": "emptytext", "jpg": img, "json": b'{"caption": "  "}'},
        {"__key__": "wrongtype", "jpg": img, "json": b'{"caption": "x", "regions": [{"box": "12", "phrase": "p"}]}'},
        {"__key__": "nojson", "jpg": img},
        {"__key__": "latin1", "jpg": img, "json": b'{"caption": "caf\xe9"}'},
        {"__key__": "boxes", "jpg": img, "json": json.dumps({"caption": "a red square", "regions": [
            {"box": [4, 4, 0, 10], "phrase": "flat"}, {"box": [100, 100, 5, 5], "phrase": "outside"}]}).encode()},
    ]
    paths = [str(root / f"img-{i}.tar") for i in range(4)]
    groups = [good[:10] + [None] * len(bad), good[10:20], good[20:30], good[30:36]]
    for path, group in zip(paths, groups):
        with wds.TarWriter(path, encoder=False) as w:
            for i, s in enumerate(group):
                w.write(bad[i - 10] if s is None else record(s))
    data = Path(paths[1]).read_bytes()  # truncated: the samples before the cut remain readable
    Path(paths[1]).write_bytes(data[:len(data) - 12000])
    return paths


def video_shards(root: Path) -> list:
    clips = generate_clips("train", 12, seed=11, size=64)
    records = [{"__key__": c["key"], "mp4": c["mp4"], "json": json.dumps({"caption": c["caption"]}).encode()}
               for c in clips]
    mp4 = clips[0]["mp4"]
    bad = [
        {"__key__": "corrupt", "mp4": b"\x00" * 64 + mp4[64:200], "json": b'{"caption": "a red circle"}'},
        {"__key__": "zerolength", "mp4": b"", "json": b'{"caption": "a red circle"}'},
        {"__key__": "novideo", "json": b'{"caption": "a red circle"}'},
        {"__key__": "badjson", "mp4": mp4, "json": b"{not json"},
        {"__key__": "nocaption", "mp4": mp4, "json": b'{"caption": ""}'},
    ]
    paths = [str(root / f"vid-{i}.tar") for i in range(2)]
    for path, group in zip(paths, [records[:6] + bad, records[6:]]):
        with wds.TarWriter(path, encoder=False) as w:
            for r in group:
                w.write(r)
    return paths


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    images, videos = image_shards(root), video_shards(root)
    train_tokenizer([s["caption"] for s in generate("train", 50, seed=11, image_size=64)]
                    + [c["caption"] for c in generate_clips("train", 12, seed=11, size=64)], str(root / "tok"))
    cfg = update(load_config("tiny"), {
        "data.sources": [SourceConfig(name="images", kind="region", shards=images, batch_size=4),
                         SourceConfig(name="videos", kind="video", shards=videos, batch_size=2, max_frames=2)],
        "train.stages": [], "train.steps": 14, "train.save_every": 14, "train.log_every": 1, "train.precision": "fp32",
        "train.wandb_mode": "disabled", "train.warmup_steps": 2, "data.num_workers": 1,
        "data.max_skip_fraction": 0.5, "model.video.max_frames": 4, "model.text.tokenizer": str(root / "tok"),
        "train.out_dir": str(root / "run")})
    save_config(cfg, root / "config.yaml")
    return root, cfg, images, videos


@pytest.fixture(scope="module")
def run(single_process_env):
    def run_one(config, vanish, *extra):
        return subprocess.run([sys.executable, "-c", SCRIPT, str(config), vanish, *extra], env=single_process_env(),
                              capture_output=True, text=True, timeout=600)
    return run_one


def reference_counts(cfg, source_index: int, consumed: int) -> dict:
    """The bad samples that the first `consumed` training batches of a source met, read again in this process
    (no loader workers, same seed as the run's loader; the vanished shard stays in the list, as in the run)."""
    src = cfg.data.sources[source_index]
    tok = load_tokenizer(cfg.model.text.tokenizer)
    loader = build_loader(src, dataclasses.replace(cfg.data, num_workers=0), tok, 64, cfg.model.text.max_len,
                          cfg.loss, seed=cfg.train.seed + 100003 * source_index)
    total: dict = {}
    for _, batch in zip(range(consumed), loader):
        for k, v in batch["skipped"].items():
            total[k] = total.get(k, 0) + v
    return total


def test_damaged_shards_are_skipped_counted_exactly_and_training_proceeds(damaged, run, monkeypatch):
    import x2vlm.data.shards

    root, cfg, images, _ = damaged
    p = run(root / "config.yaml", images[3])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))
    state = json.loads((root / "run" / "checkpoints" / "step14" / "rank0.json").read_text())
    # one pass over the images is 35 good samples in 9 batches; 14 steps read the images a second time
    assert state["data"]["images"]["workers"]["0"]["epoch"] == 1
    monkeypatch.setattr(x2vlm.data.shards, "expand_shards", lambda paths: sorted(set(map(str, paths))))
    expected = {}
    for i, name in enumerate(("images", "videos")):
        for k, v in reference_counts(cfg, i, state["data"][name]["consumed"]).items():
            expected[k] = expected.get(k, 0) + v
    got = {k[len("skipped/"):]: v for k, v in rows[-1].items() if k.startswith("skipped/")}
    assert got == expected
    assert state["data"]["videos"]["workers"]["0"]["epoch"] >= 1
    for kind in {**IMAGE_DAMAGE, **VIDEO_DAMAGE}:  # a full pass over each source: all its damage at least once
        assert got[kind] >= IMAGE_DAMAGE.get(kind, 0) + VIDEO_DAMAGE.get(kind, 0), kind
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["loss"]) for r in rows)


def test_too_many_bad_samples_stop_the_run(damaged, run):
    root, _, images, _ = damaged
    p = run(root / "config.yaml", "", "data.max_skip_fraction=0.05", f"train.out_dir={root / 'strict'}",
            f"data.sources.0.shards=[{images[0]}]")
    assert p.returncode != 0
    assert "were bad" in p.stderr and "> data.max_skip_fraction 5.0%" in p.stderr, p.stderr[-2000:]
