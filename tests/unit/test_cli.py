"""The command line: clear one-line errors for bad configuration, and the annotation converter's accounting."""
import json
import subprocess
import sys

from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "x2vlm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_wrong_key_stops_before_any_work(tmp_path):
    p = run("pretrain", "--config", "tiny", "model.fusion.layerz=2", f"train.out_dir={tmp_path}/run")
    assert p.returncode == 2
    assert p.stderr.strip() == ("x2vlm pretrain: error: model.fusion.layerz: unknown key "
                                "(expected one of: dropout, heads, intermediate_size, layers, style, vision_positions)")
    assert not (tmp_path / "run").exists()
    p = run("pretrain", "--config", "tiny", f"data.sources.0.shards=[{tmp_path}/none-*.tar]")
    assert p.returncode == 2 and "data.sources.0.shards" in p.stderr and "no shard matches" in p.stderr


def test_make_shards_counts_what_it_skips(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    entries = [
        {"image": "a.jpg", "caption": "a red picture", "regions": [{"box": [5, 5, 10, 10], "phrase": "red"},
                                                                  {"box": [100, 100, 5, 5], "phrase": "outside"}]},
        {"image": "missing.jpg", "caption": "gone"},
        {"image": "broken.jpg", "caption": "broken"},
        {"image": "a.jpg", "caption": "   "},
    ]
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(json.dumps(e) for e in entries))
    p = run("make-shards", "--annotations", str(ann), "--image-root", str(tmp_path), "--out", str(tmp_path / "s"))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for line in ("skipped 1 entry: bad_box", "skipped 1 entry: empty_text", "skipped 1 entry: missing_image",
                 "skipped 1 entry: unreadable_image", "1 usable images"):
        assert line in out, out
    from x2vlm.data.pipeline import iterate_samples

    samples = list(iterate_samples([str(tmp_path / "s" / "data-000000.tar")]))
    assert len(samples) == 1 and samples[0]["json"]["regions"] == [{"box": [5.0, 5.0, 10.0, 10.0], "phrase": "red"}]
    ann.write_text(json.dumps({"image": "missing.jpg", "caption": "x"}))
    p = run("make-shards", "--annotations", str(ann), "--image-root", str(tmp_path), "--out", str(tmp_path / "t"))
    assert p.returncode == 1 and "no usable entry" in p.stderr
