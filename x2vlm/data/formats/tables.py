"""CSV / TSV tables of (file, caption) to image or video shards (`x2vlm make-shards --format csv`), e.g. CC3M or
WebVid style lists of downloaded files.

Columns are named by `path_column` and `caption_column`: header names, or 0-based numbers for a file without a
header row. The path column may also be a template of columns, e.g. "{page_dir}/{videoid}.mp4" (WebVid's
layout). A path is relative to the media root; a name without an extension is tried with the usual ones (.jpg,
.png, .webp for images; .mp4, .webm, .mkv, .mov, .avi for videos). The delimiter is a tab for .tsv files and a
comma otherwise, unless given. Rows naming the same file are one sample with all their captions. The other
columns of a header row are kept in the sample's json (a WebVid "duration" such as "PT00H00M11S" as seconds).
Videos are stored as they are (the "mp4" form), after a check that their first frame decodes.

Skipped and counted: rows without the columns ("bad_row"), without a caption ("empty_text"), files missing or
unreadable ("missing_image", "unreadable_image", "missing_video", "unreadable_video").
"""
from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

from x2vlm.data.formats.common import Counted, convert, report_skips, texts, write_images
from x2vlm.data.samples import VIDEO_EXTS, iso_duration
from x2vlm.data.shards import sample_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _column(spec: str, header: list | None, path: str):
    """An index into a row, or a template (a str with "{...}")."""
    if "{" in spec:
        return spec
    if spec.isdigit():
        return int(spec)
    if header is None or spec not in header:
        raise ValueError(f"{path}: no column {spec!r} (columns: {', '.join(header or [])})")
    return header.index(spec)


def _value(row: list, col, header: list | None):
    if isinstance(col, int):
        return row[col] if col < len(row) else None
    try:
        return col.format(**dict(zip(header or [], row)))
    except (KeyError, IndexError, ValueError):
        return None


def _locate(root: Path, name: str, suffixes) -> Path:
    path = root / name
    if path.suffix or path.exists():
        return path
    return next((p for p in (path.with_name(path.name + s) for s in suffixes) if p.exists()), path)


def rows(path: str, path_column: str, caption_column: str, delimiter: str | None):
    """(row number, {"file", "caption", "fields"}) of a table, or (row number, None) for a row without the
    columns."""
    csv.field_size_limit(sys.maxsize)
    delimiter = delimiter or ("\t" if path.endswith(".tsv") else ",")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        named = not (path_column.isdigit() and caption_column.isdigit())
        header = next(reader, None) if named else None
        pcol, ccol = _column(path_column, header, path), _column(caption_column, header, path)
        for n, row in enumerate(reader, 2 if named else 1):
            if not row:
                continue
            name, caption = _value(row, pcol, header), _value(row, ccol, header)
            if not name or caption is None:
                yield n, None
                continue
            fields = {}
            if header:
                used = {pcol, ccol}
                for i, (h, v) in enumerate(zip(header, row)):
                    if i not in used and h:
                        fields[h] = iso_duration(v) if h == "duration" and iso_duration(v) is not None else v
            yield n, {"file": name.strip(), "caption": caption, "fields": fields}


def video_check(task: dict):
    """(video sample or None, {reason: 1}) after decoding the first frame."""
    from x2vlm.data.formats.video import VideoFiles

    why = VideoFiles.check(Path(task["video"]))
    return (None, {why: 1}) if why else (task, {})


def table_to_shards(annotations: str, root: str, out_dir: str, prefix: str = "data", per_shard: int = 1000,
                    processes: int = 1, path_column: str = "path", caption_column: str = "caption",
                    delimiter: str | None = None, media: str = "image") -> list:
    """A CSV / TSV table -> image shards (media="image") or video shards (media="video")."""
    if media not in ("image", "video"):
        raise ValueError(f"media: expected 'image' or 'video', got {media!r}")
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"{annotations}: no such file")
    skipped, by_file = Counter(), {}
    suffixes = IMAGE_SUFFIXES if media == "image" else tuple(f".{e}" for e in VIDEO_EXTS)
    for _, row in rows(annotations, path_column, caption_column, delimiter):
        if row is None:
            skipped["bad_row"] += 1
            continue
        captions = texts(row["caption"])
        if not captions:
            skipped["empty_text"] += 1
            continue
        entry = by_file.setdefault(row["file"], {"captions": [], "fields": row["fields"]})
        entry["captions"] += captions
    root_path = Path(root)
    if media == "image":
        tasks = ({"key": sample_key(name), "image": str(_locate(root_path, name, suffixes)),
                  "captions": e["captions"], "fields": e["fields"]} for name, e in by_file.items())
        return write_images(tasks, out_dir, prefix, per_shard, processes, "images", annotations, skipped,
                            total=len(by_file))
    from x2vlm.data.samples import write_video_shards

    tasks = ({"key": sample_key(name), "video": str(_locate(root_path, name, suffixes)),
              "json": {**e["fields"], "caption": e["captions"][0], "captions": e["captions"]}}
             for name, e in by_file.items())
    samples = Counted(convert(tasks, video_check, processes, len(by_file), Path(annotations).name, skipped))
    paths = write_video_shards(samples, out_dir, prefix, per_shard)
    report_skips(skipped, samples.n, "videos", annotations)
    return paths
