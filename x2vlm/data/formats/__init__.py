"""Converters from published annotation formats to shards (`x2vlm make-shards --format ...`): each reads its
files as they are published, skips and counts what it cannot use, and writes image, region or video shards."""
