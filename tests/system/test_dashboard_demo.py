"""The demo's dashboard (--full: the whole demo runs): held-out numbers logged while pre-training rise from the
untrained model's, every run's evaluations are in its eval.jsonl, and the report the demo writes (and prints)
shows every run with pictures that exist, video QA by question type per aggregator included."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def check_demo(out: Path, printed: str) -> None:
    page = out / "report" / "index.html"
    assert f"report: {page}" in printed
    evals = [json.loads(line) for line in (out / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 100, 200, 300, 400, 500, 560]
    first, last = evals[0], evals[-1]
    assert last["image_retrieval"]["t2i_r5"] > first["image_retrieval"]["t2i_r5"] + 0.3
    assert last["grounding"]["acc_iou50"] > first["grounding"]["acc_iou50"] + 0.2
    assert last["video_retrieval"]["t2v_r5"] > first["video_retrieval"]["t2v_r5"] + 0.1
    for run in ("finetune_video_retrieval", "finetune_video_qa_mean", "finetune_video_qa_attention"):
        assert len((out / run / "eval.jsonl").read_text().splitlines()) >= 3, run
    text = page.read_text()
    sources = re.findall(r"<img src=['\"]([^'\"]+)['\"]", text)
    assert len(sources) > 100 and all((page.parent / s).stat().st_size > 100 for s in sources)
    assert re.findall(r"<h2 id=\"run\d\">([^<]+)</h2>", text)[0] == "run"
    assert "Video QA accuracy by question type per aggregator" in text and "direction" in text


@pytest.mark.full
def test_the_demo_shows_held_out_numbers_rising_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "x2vlm", "demo", "--out", str(out)], capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "WANDB_MODE": "offline"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    check_demo(out, p.stdout)
