"""What every converter shares: reading annotation files (JSON, JSON lines, restricted pickles), turning captions
and images into sample fields, running the per-entry work in parallel processes with deterministic output, and
reporting what was skipped, by reason.

Parallel work: `convert(tasks, work, processes, ...)` applies a module-level function to each task in worker
processes and hands the results back in task order, so the shards written are the same whatever the process
count. Tasks are taken in windows, so that a large annotation file is never held in full by the process pool.
A progress bar is shown by the main process only, and only when it writes to a terminal.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

from PIL import Image

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".txt")


def parse_json(text: str, where: str):
    """json.loads, with a ValueError that names the file (and line) when the text is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def read_annotations(path: str) -> list:
    """The entries of a JSON list, or of JSON lines (one object a line)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        entries = parse_json(text, path)
    else:
        entries = [parse_json(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list or JSON lines")
    return entries


def read_json(path: str):
    """A JSON file's content (ValueError naming the file when it is not JSON)."""
    return parse_json(Path(path).read_text(encoding="utf-8"), str(path))


def annotation_files(paths) -> list:
    """Files and folders (their .json / .jsonl / .txt files, sorted) -> files, in the order given."""
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in ANNOTATION_SUFFIXES and q.is_file())
            if not found:
                raise FileNotFoundError(f"{p}: no annotation files (.json, .jsonl) in this folder")
            out += [str(q) for q in found]
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file")
    return out


def json_lines(path: str):
    """(line number, entry) of a JSON-lines file, one at a time; a JSON list file is read whole."""
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        if first == "[":
            yield from enumerate(read_annotations(path), 1)
            return
        f.seek(0)
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, parse_json(line, f"{path} line {n}")


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and scalars only: any class or function the pickle names is
    refused, so a pickle cannot run code."""

    ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name}; only plain containers and "
                                     f"scalars are read")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused: the pickle refers to persistent objects")


def read_plain_pickle(path: str):
    """The content of a pickle made of plain containers and scalars (Python 2 pickles too: their byte strings
    are read as UTF-8 text). ValueError naming the file for anything else."""
    try:
        with open(path, "rb") as f:
            return PlainUnpickler(f, encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a readable pickle of plain data ({e})") from None


def texts(value, lang: str | None = None) -> list:
    """Captions of an annotation value: a string, a list of strings, or a {language: string} dict (all its
    languages, or only `lang`); blank ones dropped."""
    if isinstance(value, dict):
        value = [value.get(lang)] if lang else list(value.values())
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def caption_fields(captions: list) -> dict:
    """The sample fields of an image's or clip's captions: "caption" (the first) and "captions" (all)."""
    return {"caption": captions[0], "captions": list(captions)}


def load_image(source) -> tuple:
    """(bytes to store, (width, height), None) of an image file or encoded bytes, or (None, None, reason):
    "missing_image" or "unreadable_image". The image is decoded whole to be sure it is usable; JPEG, PNG and
    WebP bytes are stored as they are, other formats as JPEG."""
    if not isinstance(source, (bytes, bytearray)):
        try:
            source = Path(source).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None, None, "missing_image"
        except OSError:
            return None, None, "unreadable_image"
    try:
        with Image.open(io.BytesIO(source)) as im:
            im.load()
            size, kind = im.size, im.format
            if kind not in ("JPEG", "PNG", "WEBP"):
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=95)
                source = buf.getvalue()
    except Exception:
        return None, None, "unreadable_image"
    if min(size) < 1:
        return None, None, "unreadable_image"
    return bytes(source), size, None


def _window(tasks, size: int):
    it = iter(tasks)
    while chunk := list(islice(it, size)):
        yield chunk


def convert(tasks, work, processes: int = 1, total: int | None = None, desc: str = "converting", skipped=None):
    """Samples of `work(task) -> (sample or None, {reason: count})` over tasks, in task order, with the reasons
    added to `skipped`. `processes` > 1 runs the work in that many processes (`work` and the tasks must pickle)."""
    from tqdm import tqdm

    skipped = Counter() if skipped is None else skipped
    # (the workers start before the progress bar's thread does: forking a process with threads is unsafe)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(processes) if processes > 1 else None
    bar = tqdm(total=total, desc=desc, unit=" entries", disable=not sys.stderr.isatty(), file=sys.stderr,
               leave=False)
    try:
        if pool is None:
            results = map(work, tasks)
        else:
            results = (r for window in _window(tasks, 256 * processes)
                       for r in pool.imap(work, window, chunksize=max(1, len(window) // (4 * processes))))
        for sample, reasons in results:
            skipped.update(reasons or {})
            bar.update(1)
            if sample is not None:
                yield sample
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def default_processes() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def report_skips(skipped: dict, usable: int, what: str, source: str) -> None:
    """Print what was skipped, by reason, and how much is usable; ValueError when nothing is."""
    for reason, n in sorted(skipped.items()):
        if n:
            print(f"skipped {n} entr{'y' if n == 1 else 'ies'}: {reason}")
    if not usable:
        raise ValueError(f"{source}: no usable entry ({sum(skipped.values())} skipped)")
    print(f"{usable} usable {what}")


class Counted:
    """Passes items through and counts them (samples handed to a shard writer)."""

    def __init__(self, items):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item


def region(box, phrases: list) -> tuple:
    """({"box", "phrase", "phrases"?}, None) of an annotated region, or (None, reason): "bad_box" for a box that
    is not four finite numbers, "empty_text" for a region without a phrase."""
    from x2vlm.boxes import box_ok

    if not box_ok(box):
        return None, "bad_box"
    if not phrases:
        return None, "empty_text"
    r = {"box": [float(v) for v in box], "phrase": phrases[0]}
    if len(phrases) > 1:
        r["phrases"] = list(phrases)
    return r, None


def image_sample(task: dict):
    """(sample for write_shards or None, {reason: count}) of one image: task {"key", "image" (a path, encoded
    bytes, or base64 text with "base64": true), "captions", "regions" ([{"box", "phrase", ...}], boxes in pixels),
    "size" (optional (width, height) the boxes were given for: they are scaled to the file's size), "fields"
    (further JSON fields)}. Boxes are clipped to the image; a box with no area inside is dropped and counted
    ("bad_box"); an image left with neither caption nor region is skipped ("no_text")."""
    import base64
    import binascii

    from x2vlm.boxes import clip_xywh

    image = task["image"]
    if task.get("base64"):
        try:
            image = base64.b64decode("".join(image.split()), validate=True)
        except (binascii.Error, ValueError, TypeError):
            return None, {"bad_base64": 1}
    data, size, why = load_image(image)
    if data is None:
        return None, {why: 1}
    reasons: Counter = Counter()
    declared = task.get("size")
    sx, sy = (size[0] / declared[0], size[1] / declared[1]) if declared and min(declared) > 0 else (1.0, 1.0)
    regions = []
    for r in task.get("regions") or []:
        x, y, w, h = r["box"]
        box = clip_xywh([x * sx, y * sy, w * sx, h * sy], *size)
        if box is None:
            reasons["bad_box"] += 1
            continue
        regions.append({**r, "box": box})
    captions = task.get("captions") or []
    if not captions and not regions:
        reasons["no_text"] += 1
        return None, reasons
    sample = {**(task.get("fields") or {}), "key": task["key"], "image": data}
    if captions:
        sample.update(caption_fields(captions))
    if regions:
        sample["regions"] = regions
    return sample, reasons


def write_images(tasks, out_dir: str, prefix: str, per_shard: int, processes: int, what: str, source: str,
                 skipped: Counter, total: int | None = None) -> list:
    """image_sample over the tasks (in parallel, in order) into image shards; prints the skips; returns the
    shard paths (ValueError when nothing was usable)."""
    from x2vlm.data.samples import write_shards

    samples = Counted(convert(tasks, image_sample, processes, total, f"{Path(source).name}", skipped))
    paths = write_shards(samples, out_dir, prefix, per_shard)
    report_skips(skipped, samples.n, what, source)
    return paths
