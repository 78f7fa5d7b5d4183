"""Converters from the published video-text data formats to video shards (`x2vlm make-shards --format ...`).

Retrieval (MSRVTT): a JSON list (or JSONL) of {"video_id": "video123" or "video": "path.mp4", "caption": str or
[str, ...]}. Training files repeat a video with one caption per entry; the 1k-A test file has one caption per
video. Videos are `VIDEO_ROOT/<video_id>.mp4` (or the "video" path, relative to VIDEO_ROOT). Output: one sample
per video, json {"video_id", "caption" (the first), "captions" (all, in file order)}.

Video QA (MSRVTT-QA, MSVD-QA): a JSON list or JSONL of {"video_id" or "video", "question", "answer", optional
"type" (or "answer_type")}. Output: one sample per video, json {"video_id", "qa": [{"question", "answer",
"type", "label"}]}, where label is the answer's index in the answer vocabulary, or -1 for an answer outside it:
such questions are kept, and evaluation counts them wrong. The vocabulary is a given `ans2label` JSON
({answer: index}) or, when absent, built from the file's answers by frequency (the `vocab_size` most frequent;
1,500 for MSRVTT-QA and 1,000 for MSVD-QA in the literature); it is written next to the shards as
`ans2label.json` either way.

Entries that cannot be used are skipped and counted by reason (bad_entry, empty_text, missing_video,
unreadable_video); the counts are printed, and a file with nothing usable raises ValueError.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from x2vlm.data.formats.common import parse_json, read_annotations, report_skips
from x2vlm.data.samples import write_video_shards
from x2vlm.data.shards import sample_key


def _video_id(entry: dict) -> str | None:
    vid = entry.get("video_id", entry.get("video"))
    if isinstance(vid, int):
        vid = f"video{vid}"
    return vid if isinstance(vid, str) and vid.strip() else None


class VideoFiles:
    """Finds and checks (decodes one frame) the video file of an entry. A file is decoded once per process however
    many annotation files name it (the verdict is kept by path, size and modification time)."""

    verdicts: dict = {}

    def __init__(self, root: str, skipped: Counter):
        self.root, self.skipped = Path(root), skipped

    def path(self, entry: dict) -> Path | None:
        vid = _video_id(entry)
        if vid is None:
            self.skipped["bad_entry"] += 1
            return None
        path = self.root / (vid if Path(vid).suffix else f"{vid}.mp4")
        kind = self.check(path)
        if kind:
            self.skipped[kind] += 1
            return None
        return path

    @classmethod
    def check(cls, path: Path) -> str | None:
        """None for a readable video, else why not: "missing_video" or "unreadable_video"."""
        from video.decode import read_video
        from video.errors import VideoDecodeError

        if not path.is_file():
            return "missing_video"
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in cls.verdicts:
            try:
                read_video(str(path), fps=1.0, max_frames=1)
                cls.verdicts[key] = None
            except VideoDecodeError:
                cls.verdicts[key] = "unreadable_video"
        return cls.verdicts[key]


def _texts(value) -> list:
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _write(by_path: dict, root: Path, out_dir: str, prefix: str, per_shard: int, reencode_gop: float | None,
           skipped: Counter) -> list:
    samples = [{"key": sample_key(p.relative_to(root)), "video": str(p), "json": meta} for p, meta in by_path.items()]
    counts: dict = {}
    paths = write_video_shards(samples, out_dir, prefix, per_shard, reencode_gop=reencode_gop, skipped=counts)
    if counts:
        skipped["unreadable_video"] += counts["video_decode"]
        print(f"skipped {counts['video_decode']} video(s) that could not be re-encoded exactly: unreadable_video")
    return paths


def retrieval_to_shards(annotations: str, video_root: str, out_dir: str, prefix: str = "data",
                        per_shard: int = 500, reencode_gop: float | None = None) -> list:
    """MSRVTT-style retrieval annotations -> video shards (one sample per video with all its captions)."""
    skipped: Counter = Counter()
    files = VideoFiles(video_root, skipped)
    by_path: dict = {}
    for entry in read_annotations(annotations):
        if not isinstance(entry, dict):
            skipped["bad_entry"] += 1
            continue
        captions = _texts(entry.get("caption", entry.get("captions")))
        if not captions:
            skipped["empty_text"] += 1
            continue
        path = files.path(entry)
        if path is None:
            continue
        meta = by_path.setdefault(path, {"video_id": path.stem, "caption": captions[0], "captions": []})
        meta["captions"] += captions
    report_skips(skipped, len(by_path), "videos", annotations)
    return _write(by_path, Path(video_root), out_dir, prefix, per_shard, reencode_gop, skipped)


def build_ans2label(answers, vocab_size: int) -> dict:
    """The `vocab_size` most frequent answers -> index (ties broken by first appearance)."""
    return {a: i for i, (a, _) in enumerate(Counter(answers).most_common(vocab_size))}


def videoqa_to_shards(annotations: str, video_root: str, out_dir: str, prefix: str = "data", per_shard: int = 500,
                      ans2label: str | None = None, vocab_size: int = 1500,
                      reencode_gop: float | None = None) -> list:
    """MSRVTT-QA / MSVD-QA annotations -> video shards (one sample per video with its questions) and
    OUT_DIR/ans2label.json."""
    skipped: Counter = Counter()
    files = VideoFiles(video_root, skipped)
    entries = []
    for entry in read_annotations(annotations):
        if not isinstance(entry, dict):
            skipped["bad_entry"] += 1
            continue
        question, answer = _texts(entry.get("question")), _texts(entry.get("answer"))
        if not question or not answer:
            skipped["empty_text"] += 1
            continue
        path = files.path(entry)
        if path is not None:
            kind = entry.get("type", entry.get("answer_type", ""))
            entries.append((path, question[0], answer[0], kind if isinstance(kind, str) else str(kind)))
    if ans2label:
        vocab = parse_json(Path(ans2label).read_text(encoding="utf-8"), str(ans2label))
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{ans2label}: expected a JSON object {{answer: index}}")
    else:
        vocab = build_ans2label([a for _, _, a, _ in entries], vocab_size)
    by_path: dict = {}
    for path, question, answer, kind in entries:
        meta = by_path.setdefault(path, {"video_id": path.stem, "qa": []})
        meta["qa"].append({"question": question, "answer": answer, "type": kind, "label": vocab.get(answer, -1)})
    outside = sum(vocab.get(a, -1) < 0 for _, _, a, _ in entries)
    report_skips(skipped, len(entries), f"questions on {len(by_path)} videos ({outside} with an answer outside the "
                                   f"vocabulary of {len(vocab)})", annotations)
    paths = _write(by_path, Path(video_root), out_dir, prefix, per_shard, reencode_gop, skipped)
    (Path(out_dir) / "ans2label.json").write_text(json.dumps(vocab, indent=0) + "\n", encoding="utf-8")
    return paths
