"""Converters of the published video formats (MSRVTT retrieval, MSRVTT-QA / MSVD-QA) on small files with broken
entries: what is skipped is counted by reason, what is kept lands in the shards, an empty result is an error."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from video.encode import encode_video
from x2vlm.data.pipeline import iterate_samples
from x2vlm.data.samples import ClipDecoder
from x2vlm.data.formats.video import build_ans2label, retrieval_to_shards, videoqa_to_shards


def iterate_video_samples(shards, skipped=None, **sampling):
    """Decoded clips of video shards in order (sampling: fps, max_frames, min_frames)."""
    return iterate_samples(shards, ClipDecoder(**sampling), skipped)


@pytest.fixture()
def videos(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    for name in ("video1", "video2", "video3"):
        (root / f"{name}.mp4").write_bytes(encode_video(frames, fps=2))
    (root / "video9.mp4").write_bytes(b"not a video at all")
    return root


def metas(out):
    return {s["json"]["video_id"]: s["json"] for s in iterate_video_samples(sorted(out.glob("*.tar")), max_frames=2)}


def test_retrieval_converter(tmp_path, videos, capsys):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([
        {"video_id": "video1", "caption": "a man is cooking"},
        {"video_id": "video1", "caption": "someone cooks pasta"},
        {"video": "video2.mp4", "caption": ["a cat", "a small cat"]},
        {"video_id": "video3", "caption": "   "},
        {"video_id": "video7", "caption": "missing file"},
        {"video_id": "video9", "caption": "broken file"},
        {"video_id": "video9", "caption": "broken file again"},
        "not an entry",
    ]))
    paths = retrieval_to_shards(str(ann), str(videos), str(tmp_path / "out"), per_shard=1)
    printed = capsys.readouterr().out
    for line in ("skipped 1 entry: bad_entry", "skipped 1 entry: empty_text", "skipped 1 entry: missing_video",
                 "skipped 2 entries: unreadable_video", "2 usable videos"):
        assert line in printed, printed
    assert len(paths) == 2
    m = metas(tmp_path / "out")
    assert m["video1"]["captions"] == ["a man is cooking", "someone cooks pasta"]
    assert m["video2"]["caption"] == "a cat" and m["video2"]["captions"] == ["a cat", "a small cat"]


def test_videoqa_converter_builds_vocabulary_and_keeps_unknown_answers(tmp_path, videos, capsys):
    rows = [{"video_id": "video1", "question": "what is cooked?", "answer": "pasta", "type": "what"},
            {"video_id": "video1", "question": "who cooks?", "answer": "man", "type": "who"},
            {"video_id": "video2", "question": "what animal?", "answer": "cat", "type": "what"},
            {"video_id": "video2", "question": "what colour?", "answer": "cat"},
            {"video_id": "video2", "question": "", "answer": "x"},
            {"video_id": "video7", "question": "where?", "answer": "home"}]
    ann = tmp_path / "qa.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    videoqa_to_shards(str(ann), str(videos), str(out), vocab_size=2)
    printed = capsys.readouterr().out
    assert "skipped 1 entry: empty_text" in printed and "skipped 1 entry: missing_video" in printed
    assert "4 usable questions on 2 videos (1 with an answer outside the vocabulary of 2)" in printed
    vocab = json.loads((out / "ans2label.json").read_text())
    assert vocab == {"cat": 0, "pasta": 1}  # by frequency, ties by first appearance
    m = metas(out)
    qa = [(q["answer"], q["label"], q["type"]) for q in m["video1"]["qa"]]
    assert qa == [("pasta", 1, "what"), ("man", -1, "who")]
    assert [q["label"] for q in m["video2"]["qa"]] == [0, 0]
    given = tmp_path / "ans2label.json"
    given.write_text(json.dumps({"man": 0, "pasta": 1, "cat": 2}))
    videoqa_to_shards(str(ann), str(videos), str(tmp_path / "out2"), ans2label=str(given))
    assert [q["label"] for q in metas(tmp_path / "out2")["video1"]["qa"]] == [1, 0]


def test_ans2label_by_frequency():
    assert build_ans2label(["b", "a", "b", "c", "a", "b"], 2) == {"b": 0, "a": 1}


def test_nothing_usable_fails_with_a_clear_message(tmp_path, videos):
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps([{"video_id": "video7", "caption": "gone"}]))
    p = subprocess.run([sys.executable, "-m", "x2vlm", "make-shards", "--format", "video-retrieval", "--annotations",
                        str(ann), "--video-root", str(videos), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "no usable entry (1 skipped)" in p.stderr and "missing_video" in p.stdout


def test_retrieval_shards_feed_batches_with_video_ids_as_instances(tmp_path, videos):
    from x2vlm.config import DataConfig, LossConfig, SourceConfig
    from x2vlm.data.pipeline import build_loader, instance_id
    from x2vlm.data.tokenizer import train_tokenizer

    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"video_id": "video1", "caption": "a man is cooking"},
                               {"video_id": "video1", "caption": "someone cooks pasta"},
                               {"video_id": "video2", "caption": "a cat"}]))
    paths = retrieval_to_shards(str(ann), str(videos), str(tmp_path / "out"))
    tok_dir = tmp_path / "tok"
    train_tokenizer(["a man is cooking", "someone cooks pasta", "a cat"], str(tok_dir))
    from x2vlm.data.tokenizer import load_tokenizer

    source = SourceConfig(name="msrvtt", kind="video", shards=paths, batch_size=2, max_frames=2)
    batch = next(iter(build_loader(source, DataConfig(num_workers=0), load_tokenizer(str(tok_dir)), 32, 16,
                                   LossConfig(), seed=0)))
    ids = {k.split("_")[-1]: int(i) for k, i in zip(batch["keys"], batch["instance_ids"])}
    assert ids == {"video1": instance_id("video1"), "video2": instance_id("video2")}
    assert batch["videos"].shape[:2] == (2, 2) and batch["frame_mask"].all()


def test_qa_batches_bring_up_to_max_texts_questions_of_each_clip(tmp_path, videos):
    from x2vlm.config import DataConfig, LossConfig, SourceConfig
    from x2vlm.data.pipeline import build_loader
    from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer

    questions = {"video1": [f"question {w}" for w in "abcd"], "video2": ["question e"]}
    answers = {q: f"answer{i}" for i, q in enumerate(sum(questions.values(), []))}
    ann = tmp_path / "qa.json"
    ann.write_text(json.dumps([{"video_id": v, "question": q, "answer": answers[q]}
                               for v, qs in questions.items() for q in qs]))
    paths = videoqa_to_shards(str(ann), str(videos), str(tmp_path / "out"))
    label = json.loads((tmp_path / "out" / "ans2label.json").read_text())
    tok_dir = tmp_path / "tok"
    train_tokenizer(list(answers) + list(answers.values()), str(tok_dir))
    tok = load_tokenizer(str(tok_dir))
    for max_texts, train in ((3, True), (3, False), (10, True)):
        source = SourceConfig(name="qa", kind="video_qa", shards=paths, batch_size=2, max_frames=2,
                              max_texts=max_texts)
        batch = next(iter(build_loader(source, DataConfig(num_workers=0), tok, 32, 16, LossConfig(), seed=0,
                                       train=train)))
        clips = [k.split("_")[-1] for k in batch["keys"]]
        texts = tok.batch_decode(batch["text_ids"], skip_special_tokens=True)
        got = {v: [t for t, i in zip(texts, batch["image_idx"].tolist()) if clips[i] == v] for v in clips}
        for v, asked in got.items():  # each clip's own questions, none twice, as many as allowed
            assert len(asked) == min(max_texts, len(questions[v])) and len(set(asked)) == len(asked)
            assert set(asked) <= set(questions[v])
            if not train:
                assert asked == questions[v][:max_texts]
        assert batch["answer_labels"].tolist() == [label[answers[t]] for t in texts]
        assert batch["image_idx"].tolist() == sorted(batch["image_idx"].tolist())  # a clip's questions together


def test_published_formats_round_trip_through_the_converters(video_finetuning, tmp_path):
    import tarfile

    v = video_finetuning
    files = v.files
    assert files["qa"]["train"].endswith(".jsonl") and files["qa"]["test"].endswith(".json")
    assert json.loads(open(files["retrieval"]["test"]).read())[0] == {"video_id": v.test_clips[0]["key"],
                                                                      "caption": v.test_clips[0]["caption"]}
    # retrieval: one sample per video with its caption and the very mp4 bytes of the clip
    m = {s["json"]["video_id"]: s["json"] for s in iterate_video_samples(v.retrieval, max_frames=1)}
    assert {k: (x["caption"], x["captions"]) for k, x in m.items()} == {c["key"]: (c["caption"], [c["caption"]])
                                                                       for c in v.clips}
    with tarfile.open(v.retrieval[0]) as tar:
        name = next(n for n in tar.getnames() if n.endswith(".mp4"))
        assert tar.extractfile(name).read() == next(c["mp4"] for c in v.clips if c["key"] == name[:-4])
    # QA: the test split converted with the training split's vocabulary
    vocab = str(v.root / "qa" / "ans2label.json")
    test = videoqa_to_shards(files["qa"]["test"], files["videos"], str(tmp_path / "qa_test"), ans2label=vocab)
    labels = json.loads(open(vocab).read())
    for shards, clips in ((v.qa, v.clips), (test, v.test_clips)):
        got = {s["json"]["video_id"]: s["json"]["qa"] for s in iterate_video_samples(shards, max_frames=1)}
        assert got == {c["key"]: [{**q, "label": labels.get(q["answer"], -1)} for q in c["qa"]] for c in clips}


def test_a_line_that_is_not_json_is_named_in_the_error(tmp_path, videos):
    ann = tmp_path / "qa.jsonl"
    ann.write_text(json.dumps({"video_id": "video1", "question": "what?", "answer": "red"}) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"qa.jsonl line 2: not JSON"):
        videoqa_to_shards(str(ann), str(videos), str(tmp_path / "o"))
    vocab = tmp_path / "ans2label.json"
    vocab.write_text("{'red': 0}")
    ann.write_text(json.dumps({"video_id": "video1", "question": "what?", "answer": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"ans2label.json: not JSON"):
        videoqa_to_shards(str(ann), str(videos), str(tmp_path / "o"), ans2label=str(vocab))


def test_make_shards_reencodes_with_a_keyframe_every_second(tmp_path):
    """`--reencode-gop 1`: every video in the shards has a keyframe at each 1-fps sample time and the same frames
    at the same times as its source."""
    import av

    from video.indexcode import index_frame, read_index

    root = tmp_path / "videos"
    root.mkdir()
    source = encode_video([index_frame(i) for i in range(60)], fps=10, threads=1)  # 6 s, libx264's long GOP
    (root / "video1.mp4").write_bytes(source)
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"video_id": "video1", "caption": "a clip"}]))
    p = subprocess.run([sys.executable, "-m", "x2vlm", "make-shards", "--format", "video-retrieval", "--annotations",
                        str(ann), "--video-root", str(root), "--out", str(tmp_path / "o"), "--reencode-gop", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (sample,) = iterate_video_samples(sorted((tmp_path / "o").glob("*.tar")), max_frames=None)
    assert [read_index(f) for f in sample["frames"]] == [5, 15, 25, 35, 45, 55]  # the frames on screen at k + 0.5 s
    (fast,) = iterate_video_samples(sorted((tmp_path / "o").glob("*.tar")), max_frames=None, seek="keyframe")
    assert [read_index(f) for f in fast["frames"]] == [5, 15, 25, 35, 45, 55]  # keyframes there: nothing approximated
    import tarfile

    with tarfile.open(next((tmp_path / "o").glob("*.tar"))) as tar:
        data = tar.extractfile("video1.mp4").read()
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        keys = sorted(float(pk.pts * stream.time_base) for pk in c.demux(stream) if pk.size and pk.is_keyframe)
    assert keys == pytest.approx([0.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
