"""What every converter shares: reading JSON and JSON-lines annotation files, and reporting what was skipped."""
from __future__ import annotations

import json
from pathlib import Path


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


def report_skips(skipped: dict, usable: int, what: str, source: str) -> None:
    """Print what was skipped, by reason, and how much is usable; ValueError when nothing is."""
    for reason, n in sorted(skipped.items()):
        print(f"skipped {n} entr{'y' if n == 1 else 'ies'}: {reason}")
    if not usable:
        raise ValueError(f"{source}: no usable entry ({sum(skipped.values())} skipped)")
    print(f"{usable} usable {what}")
