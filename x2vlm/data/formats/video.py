"""Converters from the published video-text data formats to video shards (`x2vlm make-shards --format ...`).

Retrieval (MSRVTT), in any of these forms:
- a JSON list (or JSONL) of {"video_id": "video123" or "video": "path.mp4", "caption": str or [str, ...]}; training
  files repeat a video with one caption per entry; the 1k-A test file has one caption per video;
- the official `train_val_videodatainfo.json` / `test_videodatainfo.json`: {"videos": [{"video_id", "split"}],
  "sentences": [{"video_id", "caption", "sen_id"}]}, filtered by `split` ("train", "validate", "test", several
  joined by commas);
- the 1k-A test table `MSRVTT_JSFUSION_test.csv` (columns key, vid_key, video_id, sentence).
`video_list` (a CSV with a video_id column, e.g. `MSRVTT_train.9k.csv`, or one id a line) keeps only those
videos. Videos are `VIDEO_ROOT/<video_id>.mp4` (another extension is found too), or the "video" path, relative to
VIDEO_ROOT. Output: one sample per video, json {"video_id", "caption" (the first), "captions" (all, in file
order)}.

Video QA (MSRVTT-QA, MSVD-QA): a JSON list or JSONL of {"video_id" or "video", "question", "answer", optional
"type" (or "answer_type")}. A numeric video_id N names `video<N>` (MSRVTT-QA); with MSVD-QA's
`youtube_mapping.txt` (lines "<YouTube clip name> vid<N>") it names the clip file `<YouTube clip name>.avi` (or
.mp4). Output: one sample per video, json {"video_id", "qa": [{"question", "answer", "type", "label"}]}, where
label is the answer's index in the answer vocabulary, or -1 for an answer outside it: such questions are kept,
and evaluation counts them wrong. The vocabulary is a given `ans2label` JSON ({answer: index}) or, when absent,
built from the file's answers by frequency (the `vocab_size` most frequent; 1,500 for MSRVTT-QA and 1,000 for
MSVD-QA in the literature); it is written next to the shards as `ans2label.json` either way.

Every video file is checked (its first frame decoded) once, in parallel processes. Entries that cannot be used
are skipped and counted by reason (bad_entry, empty_text, missing_video, unreadable_video, unmapped_video); the
counts are printed, and a file with nothing usable raises ValueError.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from x2vlm.data.formats.common import convert, parse_json, read_annotations, report_skips
from x2vlm.data.samples import VIDEO_EXTS, write_video_shards
from x2vlm.data.shards import sample_key


def _video_id(entry: dict, mapping: dict | None = None) -> str | None:
    vid = entry.get("video_id", entry.get("video"))
    if isinstance(vid, int) and not isinstance(vid, bool):
        vid = f"vid{vid}" if mapping is not None else f"video{vid}"
    if mapping is not None and isinstance(vid, str):
        vid = mapping.get(vid.strip(), vid)
    return vid.strip() if isinstance(vid, str) and vid.strip() else None


def read_mapping(path: str) -> dict:
    """{"vid<N>": clip name} of MSVD's youtube_mapping.txt (lines "<clip name> vid<N>")."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path} line {n}: expected '<clip name> vid<N>', got {line!r}")
        out[parts[1]] = parts[0]
    return out


class VideoFiles:
    """Finds and checks (decodes one frame) the video file of an entry. A file is decoded once per process however
    many annotation files name it (the verdict is kept by path, size and modification time); `check_all` checks
    many files in parallel processes."""

    verdicts: dict = {}

    def __init__(self, root: str, skipped: Counter, mapping: dict | None = None):
        self.root, self.skipped, self.mapping = Path(root), skipped, mapping

    def locate(self, entry: dict) -> Path | None:
        """The file an entry names (it may not exist), or None (counted) when it names none."""
        vid = _video_id(entry, self.mapping)
        if vid is None:
            self.skipped["bad_entry"] += 1
            return None
        if self.mapping is not None and vid.startswith("vid") and vid[3:].isdigit():
            self.skipped["unmapped_video"] += 1
            return None
        path = self.root / vid
        if path.suffix.lstrip(".").lower() in VIDEO_EXTS:
            return path
        found = (path.with_name(f"{path.name}.{ext}") for ext in VIDEO_EXTS)
        return next((p for p in found if p.exists()), path.with_name(f"{path.name}.mp4"))

    def path(self, entry: dict) -> Path | None:
        """The readable file of an entry, or None (the reason counted)."""
        path = self.locate(entry)
        if path is None:
            return None
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

    @classmethod
    def check_all(cls, paths, processes: int = 1) -> dict:
        """{path: None or why not} of many files."""
        paths = list(dict.fromkeys(paths))
        return dict(convert(paths, _verdict, processes, len(paths), "checking videos"))

    def keep(self, pairs: list, processes: int = 1) -> list:
        """The (path, ...) pairs whose file is readable, the others counted by reason."""
        verdicts = self.check_all([p for p, *_ in pairs], processes)
        kept = []
        for pair in pairs:
            if verdicts[pair[0]]:
                self.skipped[verdicts[pair[0]]] += 1
            else:
                kept.append(pair)
        return kept


def _verdict(path: Path):
    return (path, VideoFiles.check(path)), {}


def _texts(value) -> list:
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _write(by_path: dict, root: Path, out_dir: str, prefix: str, per_shard: int, reencode_gop: float | None,
           skipped: Counter) -> list:
    def key(p: Path) -> str:
        return sample_key(p.relative_to(root) if p.is_relative_to(root) else p.name)

    samples = [{"key": key(p), "video": str(p), "json": meta} for p, meta in by_path.items()]
    counts: dict = {}
    paths = write_video_shards(samples, out_dir, prefix, per_shard, reencode_gop=reencode_gop, skipped=counts)
    if counts:
        skipped["unreadable_video"] += counts["video_decode"]
        print(f"skipped {counts['video_decode']} video(s) that could not be re-encoded exactly: unreadable_video")
    return paths


def _video_list(path: str) -> set:
    """Video ids of a CSV with a video_id column, or of a file with one id a line."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and "video_id" in lines[0].split(","):
        return {row["video_id"].strip() for row in csv.DictReader(lines) if row.get("video_id")}
    return set(lines)


def retrieval_entries(annotations: str, split: str | None, skipped: Counter) -> list:
    """[{"video_id", "caption"}, ...] of any of the retrieval forms."""
    if annotations.endswith(".csv"):
        with open(annotations, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"video_id", "sentence"} <= set(reader.fieldnames or []):
                raise ValueError(f"{annotations}: expected the columns video_id and sentence (MSRVTT 1k-A test)")
            return [{"video_id": r["video_id"], "caption": r["sentence"]} for r in reader]
    text = Path(annotations).read_text(encoding="utf-8")
    if text.lstrip().startswith("{") and '"sentences"' in text[:10_000_000]:
        data = parse_json(text, annotations)
        if isinstance(data, dict) and "sentences" in data and "videos" in data:
            splits = {s.strip() for s in split.split(",")} if split else None
            keep = {v.get("video_id") for v in data["videos"]
                    if isinstance(v, dict) and (splits is None or v.get("split") in splits)}
            if splits and not keep:
                found = sorted({str(v.get("split")) for v in data["videos"] if isinstance(v, dict)})
                raise ValueError(f"{annotations}: no video in split {split!r} (the file has {', '.join(found)})")
            out = []
            for s in data["sentences"]:
                if not isinstance(s, dict):
                    skipped["bad_entry"] += 1
                elif s.get("video_id") in keep:
                    out.append(s)
            return out
    return read_annotations(annotations)


def retrieval_to_shards(annotations: str, video_root: str, out_dir: str, prefix: str = "data",
                        per_shard: int = 500, processes: int = 1, split: str | None = None,
                        video_list: str | None = None, reencode_gop: float | None = None) -> list:
    """MSRVTT-style retrieval annotations -> video shards (one sample per video with all its captions)."""
    skipped: Counter = Counter()
    files = VideoFiles(video_root, skipped)
    wanted = _video_list(video_list) if video_list else None
    pairs = []
    for entry in retrieval_entries(annotations, split, skipped):
        if not isinstance(entry, dict):
            skipped["bad_entry"] += 1
            continue
        if wanted is not None and _video_id(entry) not in wanted:
            continue
        captions = _texts(entry.get("caption", entry.get("captions")))
        if not captions:
            skipped["empty_text"] += 1
            continue
        path = files.locate(entry)
        if path is not None:
            pairs.append((path, captions))
    by_path: dict = {}
    for path, captions in files.keep(pairs, processes):
        meta = by_path.setdefault(path, {"video_id": path.stem, "caption": captions[0], "captions": []})
        meta["captions"] += captions
    report_skips(skipped, len(by_path), "videos", annotations)
    return _write(by_path, Path(video_root), out_dir, prefix, per_shard, reencode_gop, skipped)


def build_ans2label(answers, vocab_size: int) -> dict:
    """The `vocab_size` most frequent answers -> index (ties broken by first appearance)."""
    return {a: i for i, (a, _) in enumerate(Counter(answers).most_common(vocab_size))}


def videoqa_to_shards(annotations: str, video_root: str, out_dir: str, prefix: str = "data", per_shard: int = 500,
                      ans2label: str | None = None, vocab_size: int = 1500, processes: int = 1,
                      mapping: str | None = None, reencode_gop: float | None = None) -> list:
    """MSRVTT-QA / MSVD-QA annotations (with MSVD's youtube_mapping.txt as `mapping`) -> video shards (one sample
    per video with its questions) and OUT_DIR/ans2label.json."""
    skipped: Counter = Counter()
    files = VideoFiles(video_root, skipped, read_mapping(mapping) if mapping else None)
    pairs = []
    for entry in read_annotations(annotations):
        if not isinstance(entry, dict):
            skipped["bad_entry"] += 1
            continue
        question, answer = _texts(entry.get("question")), _texts(entry.get("answer"))
        if not question or not answer:
            skipped["empty_text"] += 1
            continue
        path = files.locate(entry)
        if path is not None:
            kind = entry.get("type", entry.get("answer_type", ""))
            pairs.append((path, question[0], answer[0], kind if isinstance(kind, str) else str(kind)))
    entries = files.keep(pairs, processes)
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
