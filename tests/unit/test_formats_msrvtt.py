"""The official MSRVTT files (train_val_videodatainfo.json by split, the 1k-A test CSV, a video list such as
MSRVTT_train.9k.csv) and MSVD-QA with its youtube_mapping.txt, to video shards; broken entries counted."""
import csv
import json

import numpy as np
import pytest

from video.encode import encode_video
from x2vlm.data.formats.video import retrieval_to_shards, videoqa_to_shards
from x2vlm.data.pipeline import iterate_samples
from x2vlm.data.samples import ClipDecoder


def clip(value):
    frames = np.full((4, 32, 32, 3), value, dtype=np.uint8)
    return encode_video(frames, fps=2)


def metas(paths):
    return {s["json"]["video_id"]: s["json"] for s in iterate_samples(paths, ClipDecoder(max_frames=1))}


@pytest.fixture()
def msrvtt(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(4):
        (root / f"video{i}.mp4").write_bytes(clip(40 * i))
    (root / "video5.mp4").write_bytes(b"broken")
    info = {"info": {"year": 2016}, "videos": [
        {"category": 9, "url": "https://www.youtube.com/watch?v=x", "video_id": f"video{i}", "start time": 1.0,
         "end time": 5.0, "split": split, "id": i}
        for i, split in ((0, "train"), (1, "train"), (2, "validate"), (3, "test"), (4, "train"), (5, "train"))],
        "sentences": [{"caption": "a man is cooking", "video_id": "video0", "sen_id": 0},
                      {"caption": "someone cooks", "video_id": "video0", "sen_id": 1},
                      {"caption": "a cat plays", "video_id": "video1", "sen_id": 2},
                      {"caption": "a car drives", "video_id": "video2", "sen_id": 3},
                      {"caption": "test caption", "video_id": "video3", "sen_id": 4},
                      {"caption": "no file", "video_id": "video4", "sen_id": 5},
                      {"caption": "broken file", "video_id": "video5", "sen_id": 6},
                      {"caption": "  ", "video_id": "video1", "sen_id": 7},
                      "garbage"]}
    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(info))
    return tmp_path


def test_official_json_by_split_and_video_list(msrvtt, capsys):
    ann, videos = str(msrvtt / "train_val_videodatainfo.json"), str(msrvtt / "videos")
    train = retrieval_to_shards(ann, videos, str(msrvtt / "train"), "train", split="train")
    printed = capsys.readouterr().out
    for line in ("skipped 1 entry: bad_entry", "skipped 1 entry: empty_text", "skipped 1 entry: missing_video",
                 "skipped 1 entry: unreadable_video", "2 usable videos"):
        assert line in printed, printed
    m = metas(train)
    assert m["video0"]["captions"] == ["a man is cooking", "someone cooks"] and sorted(m) == ["video0", "video1"]
    both = retrieval_to_shards(ann, videos, str(msrvtt / "trainval"), split="train,validate")
    assert sorted(metas(both)) == ["video0", "video1", "video2"]
    (msrvtt / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo2\n")
    listed = retrieval_to_shards(ann, videos, str(msrvtt / "9k"), video_list=str(msrvtt / "MSRVTT_train.9k.csv"))
    assert sorted(metas(listed)) == ["video1", "video2"]
    with pytest.raises(ValueError, match="no video in split 'val'"):
        retrieval_to_shards(ann, videos, str(msrvtt / "x"), split="val")


def test_1k_a_test_csv(msrvtt, capsys):
    path = msrvtt / "MSRVTT_JSFUSION_test.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "key", "vid_key", "video_id", "sentence"])
        w.writerow([0, "ret0", "msr3", "video3", "a person is singing on stage"])
        w.writerow([1, "ret1", "msr2", "video2", "a car, then another"])
        w.writerow([2, "ret2", "msr9", "video9", "missing"])
    paths = retrieval_to_shards(str(path), str(msrvtt / "videos"), str(msrvtt / "test"), "test", processes=2)
    assert "skipped 1 entry: missing_video" in capsys.readouterr().out
    m = metas(paths)
    assert {k: v["captions"] for k, v in m.items()} == {"video3": ["a person is singing on stage"],
                                                         "video2": ["a car, then another"]}


def test_msvd_qa_with_youtube_mapping(tmp_path, capsys):
    clips = tmp_path / "YouTubeClips"
    clips.mkdir()
    (clips / "-4wsuPCjDBc_5_15.avi").write_bytes(clip(100))
    (clips / "00jrXRMlZOY_0_10.avi").write_bytes(clip(200))
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n00jrXRMlZOY_0_10 vid2\n"
                                                  "gone_0_1 vid3\n")
    qa = [{"answer": "man", "id": 0, "question": "who is cutting a pepper?", "video_id": 1},
          {"answer": "pepper", "id": 1, "question": "what is a man cutting?", "video_id": 1},
          {"answer": "dog", "id": 2, "question": "what is running?", "video_id": 2},
          {"answer": "cat", "id": 3, "question": "what sleeps?", "video_id": 3},
          {"answer": "x", "id": 4, "question": "unmapped?", "video_id": 4},
          {"answer": "", "id": 5, "question": "no answer?", "video_id": 1}]
    (tmp_path / "val_qa.json").write_text(json.dumps(qa))
    paths = videoqa_to_shards(str(tmp_path / "val_qa.json"), str(clips), str(tmp_path / "out"), vocab_size=1000,
                              mapping=str(tmp_path / "youtube_mapping.txt"))
    printed = capsys.readouterr().out
    for line in ("skipped 1 entry: missing_video", "skipped 1 entry: unmapped_video", "skipped 1 entry: empty_text",
                 "3 usable questions on 2 videos"):
        assert line in printed, printed
    m = metas(paths)
    assert [q["question"] for q in m["-4wsuPCjDBc_5_15"]["qa"]] == ["who is cutting a pepper?",
                                                                    "what is a man cutting?"]
    assert m["00jrXRMlZOY_0_10"]["qa"][0]["answer"] == "dog"
    (tmp_path / "bad_mapping.txt").write_text("just-one-field\n")
    with pytest.raises(ValueError, match="bad_mapping.txt line 1"):
        videoqa_to_shards(str(tmp_path / "val_qa.json"), str(clips), str(tmp_path / "o"),
                          mapping=str(tmp_path / "bad_mapping.txt"))
