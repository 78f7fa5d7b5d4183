"""`x2vlm report`: a page from a run's files alone (curves, the last evaluation's pictures and tables), one section per
run in a folder of runs with a table of video QA accuracy by question type per aggregator, resumed steps counted
once, and a one-line error for a folder that holds no run."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from x2vlm.report import ReportError, read_records, write_report


def write_run(run: Path, aggregator: str = "attention", acc: float = 0.5) -> None:
    """A small run's files as the trainer writes them: metrics of 6 steps in 2 stages (steps 4-5 logged twice, as
    after a resume; one line cut by a crash) and two evaluations with pictures."""
    (run / "media" / "grounding").mkdir(parents=True)
    (run / "media" / "images").mkdir()
    (run / "media" / "qa").mkdir()
    lines = []
    for step in [1, 2, 3, 4, 5, 4, 5, 6]:
        lines.append(json.dumps({"step": step, "stage": int(step > 3), "loss": 10.0 - step, "loss_max": 11.0 - step,
                                 "images/loss": 5.0 - step / 2, "images/itc": 2.0, "samples_per_s": 40.0,
                                 "images_per_s": 20.0, "step_time_s": 0.5, "data_load_pct": 5.0,
                                 "tflops_per_device": 0.03, "mfu_pct": 30.0 + step, "hfu_pct": 31.0 + step,
                                 "peak_tflops": 0.1, "memory/peak_rss_gb": 1.0, "lr": 1e-4, "grad_norm": 2.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "loss"')
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(run / "media" / "images" / f"{i}.png")
    Image.new("RGB", (64, 64), "grey").save(run / "media" / "grounding" / "0.png")
    Image.new("RGB", (32, 32), "white").save(run / "media" / "qa" / "0.png")
    files = {str(i): f"media/images/{i}.png" for i in range(3)}
    evals = []
    for step, r1 in ((0, 0.1), (6, 0.4)):
        evals.append({
            "step": step,
            "image_retrieval": {"t2i_r1": r1, "t2i_r5": 0.7, "i2t_r1": r1, "itm_rerank": {"t2i_r1": r1, "k": 4},
                                "protocol": {"split": "heldout"},
                                "examples": [{"query": 0, "text": "a red square", "item": 1, "top": [0, 1, 2],
                                              "scores": [0.3, 0.2, 0.1], "answers": [1], "rank": 1,
                                              "rank_itm": 0, "files": files}]},
            "grounding": {"acc_iou50": r1, "mean_iou": 0.3, "n": 2, "right_shape": 0.5,
                          "random_shape_baseline_acc_iou50": 0.2,
                          "examples": [{"image": 0, "phrases": ["the square", "the circle"],
                                        "truth": [[2, 2, 10, 10], [30, 30, 20, 20]],
                                        "pred": [[3, 3, 10, 12], [5, 40, 8, 8]], "iou": [0.7, 0.0],
                                        "file": "media/grounding/0.png"}]},
            "video_qa": {"acc": acc, "n": 4, "chance": 0.25, "by_type": {"count": {"acc": acc, "n": 4, "chance": 0.25}},
                         "protocol": {"aggregator": aggregator},
                         "examples": [{"clip": 0, "question": "how many shapes?", "type": "count", "label": 1,
                                       "pred": 1, "right": True, "answer": "two", "predicted": "two",
                                       "file": "media/qa/0.png"}]}})
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))


def image_sources(page: Path) -> list:
    return re.findall(r"<img src=['\"]([^'\"]+)['\"]", page.read_text())


def test_report_of_a_run(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    page = write_report(run)
    assert page == run / "report" / "index.html"
    sources = image_sources(page)
    figures = [s for s in sources if s.endswith(".png") and not s.startswith("pictures/")]
    assert len(figures) >= 6 and all((page.parent / s).stat().st_size > 5000 for s in figures)
    pictures = [s for s in sources if s.startswith("pictures/")]
    assert len(pictures) >= 5 and all((page.parent / s).exists() for s in pictures)
    drawn = Image.open(page.parent / "pictures" / "run0-grounding-0.png").convert("RGB")
    assert drawn.size == (256, 256) and drawn.getpixel((8, 20)) == (40, 200, 60)  # a true box's edge, enlarged
    text = page.read_text()
    assert "a red square" in text and "how many shapes?" in text and "6 logged steps, the last at step 6" in text
    assert "Pictures of the evaluation at step 6" in text


def test_report_of_a_folder_of_runs(tmp_path):
    write_run(tmp_path / "qa_mean", "mean", 0.4)
    write_run(tmp_path / "qa_attention", "attention", 0.6)
    (tmp_path / "data").mkdir()
    page = write_report(tmp_path)
    text = page.read_text()
    assert text.count("<h2 id=") == 2 and "accuracy by question type per aggregator" in text
    table = text.split("per aggregator</h2>")[1]
    assert re.search(r"<th>attention</th><th>mean</th>", table) and "<td>0.6</td><td>0.4</td>" in table
    assert all((page.parent / s).exists() for s in image_sources(page))


def test_a_folder_without_a_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(ReportError, match="not a run folder"):
        write_report(tmp_path)
    p = subprocess.run([sys.executable, "-m", "x2vlm", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not a run folder" in p.stderr
    assert "Traceback" not in p.stderr


def test_lines_that_are_not_records_are_left_out_and_counted(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n[1, 2]\n\n{"step": 3, "lo')
    with caplog.at_level("WARNING", logger="x2vlm"):
        assert [r["step"] for r in read_records(path)] == [1, 2]
    assert "left out 2 line(s)" in caplog.text


def test_a_run_below_a_folder_named_report_is_found_and_an_unreadable_log_is_one_error(tmp_path):
    run = tmp_path / "report" / "runs" / "run"
    write_run(run)
    assert write_report(tmp_path / "report" / "runs").exists()
    bad = tmp_path / "bad"
    (bad / "metrics.jsonl").mkdir(parents=True)  # a folder where the log should be
    with pytest.raises(ReportError, match="cannot be read"):
        write_report(bad)
