"""WebDataset shards: finding them, writing them, and reading them by position across ranks and loader workers.

Writing: `ShardWriter` puts records ({"__key__", extension: bytes, ...}) into numbered tar files, each written
under a temporary name and renamed when complete. What the records hold is x2vlm.data.samples' business.

Reading (`ShardStream`): every epoch all ranks shuffle the shard list with the same seed (seed + epoch); global
worker g = rank * workers + worker then reads shards g, g + T, g + 2T, ... (T = ranks * workers), so within an
epoch no shard is read twice or missed. A shard's samples are found by its tar index (headers only) and read by
seeking, in a random order per shard and epoch. A decoder turns a sample's files into a sample; bad input is
skipped and counted: the stream then yields {"_skipped": {kind: count}} without a "key" in place of the sample,
so that the counts reach the main process through DataLoader workers. A missing, unreadable or truncated shard
counts as "bad_shard" (the samples before the damage are used).
"""
from __future__ import annotations

import glob
import os
import random
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand

from x2vlm.config import ConfigError
from x2vlm.distributed import env_rank_world


def expand_shards(patterns) -> list:
    """Paths, globs, brace patterns ("data/train-{000000..000009}.tar") or folders (their *.tar) -> sorted,
    de-duplicated paths. Raises FileNotFoundError naming any pattern that matches nothing."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        for p in braceexpand(str(pattern)):
            if os.path.isdir(p):
                found = sorted(glob.glob(os.path.join(p, "*.tar")))
            elif glob.has_magic(p):
                found = sorted(glob.glob(p))
            else:
                found = [p] if os.path.isfile(p) else []
            if not found:
                raise FileNotFoundError(f"no shard matches {p!r}")
            out.extend(found)
    return sorted(set(out))


class ShardWriter:
    """Records ({"__key__", extension: bytes, ...}) into out_dir/prefix-000000.tar, ... with at most `per_shard`
    records each. Keys must be unique, non-empty and free of '.' and '/'. Each shard is written under a temporary
    name and renamed when complete, so a reader never sees half a shard. Use as a context manager; `paths` lists
    the shards written."""

    def __init__(self, out_dir: str, prefix: str, per_shard: int):
        if per_shard < 1:
            raise ValueError(f"per_shard: expected a positive number, got {per_shard}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, per_shard
        self.paths: list = []
        self.seen: set = set()
        self.stream = self.writer = None
        self.count = 0

    @staticmethod
    def check_key(key: str) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r}: keys must be non-empty and contain no '.' or '/'")

    def write(self, record: dict) -> None:
        import webdataset as wds

        key = record["__key__"]
        self.check_key(key)
        if key in self.seen:
            raise ValueError(f"sample key {key!r}: keys must be unique")
        self.seen.add(key)
        if self.writer is None or self.count == self.per_shard:
            self.finish_shard()
            self.paths.append(str(Path(self.out_dir) / f"{self.prefix}-{len(self.paths):06d}.tar"))
            self.stream = open(self.paths[-1] + ".tmp", "wb")
            self.writer, self.count = wds.TarWriter(self.stream, encoder=False), 0
        self.writer.write(record)
        self.count += 1

    def finish_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            os.replace(self.paths[-1] + ".tmp", self.paths[-1])
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish_shard()


def sample_key(path: str | os.PathLike) -> str:
    """A shard key for a file named by a relative path: extension dropped, '/' and '.' turned into '_'."""
    return Path(path).with_suffix("").as_posix().replace("/", "_").replace(".", "_")


def require_shards(sources) -> None:
    """Every data source names shards that exist (ConfigError naming the source otherwise)."""
    for i, s in enumerate(sources):
        if not s.shards:
            raise ConfigError(f"data.sources.{i}.shards: source {s.name!r} names no shards")
        try:
            expand_shards(s.shards)
        except FileNotFoundError as e:
            raise ConfigError(f"data.sources.{i}.shards: source {s.name!r}: {e}") from None


def member_key(member: tarfile.TarInfo) -> tuple[str, str]:
    """(sample key, extension) of a tar member: "dir/KEY.EXT" -> ("dir/KEY", "ext")."""
    k, _, ext = os.path.basename(member.name).partition(".")
    return os.path.join(os.path.dirname(member.name), k), ext.lower()


def tar_index(tar: tarfile.TarFile, path: str):
    """([(key, [(ext, member), ...]), ...], damaged) of an open tar: its samples (consecutive files with one key)
    found by reading the headers only. Damaged: a member whose data runs past the end of the file, a header that
    cannot be read, or no end-of-archive marker after the last member. The samples before the damage are kept; the
    last sample found in a damaged tar is dropped, since members of it may be missing."""
    samples: list = []
    damaged = False
    try:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = member_key(member)
            if not samples or samples[-1][0] != k:
                samples.append((k, []))
            samples[-1][1].append((ext, member))
    except (OSError, EOFError, tarfile.TarError):
        damaged = True
    if not path.endswith((".gz", ".tgz", ".bz2", ".xz")):  # (offsets of a compressed tar are not file offsets)
        size = os.path.getsize(path)
        whole = [(k, ms) for k, ms in samples if all(m.offset_data + m.size <= size for _, m in ms)]
        damaged = damaged or len(whole) < len(samples)
        samples = whole
        ends = [m.offset_data + m.size for _, ms in samples for _, m in ms]
        with open(path, "rb") as f:
            f.seek(-(-max(ends, default=0) // 512) * 512)
            damaged = damaged or f.read(1024) != bytes(1024)
    if damaged and samples:
        samples.pop()
    return samples, damaged


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples of shards, split across ranks and DataLoader workers; bad input skipped and counted.

    infinite=True repeats epochs forever (training); False reads one pass (evaluation). With shuffle, every epoch
    has its own shard order (the same on all ranks) and each shard is read in its own random sample order (members
    are found by the tar index and read by seeking); shuffle=False keeps the shard and sample order.

    The order is a pure function of (seed, epoch, rank, worker), so a reader's place is three numbers: a position
    (epoch, shard, sample) = the next sample is number `sample` of shard number `shard` of this worker's shard
    list in `epoch`. Every item carries "_pos", the position after it; `start` {worker: position} makes the
    stream begin there, with no data read and discarded. Each sample's random numbers (e.g. frame offsets) come
    from a generator keyed by (seed, epoch, shard file, sample), the same whichever rank or worker reads it. Items
    without "key" carry only "_skipped" counts.
    """

    def __init__(self, shards, decode, seed: int = 0, infinite: bool = True, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None, num_workers: int | None = None):
        """`decode(key, files, rng)` -> (sample or None, {kind: count}) (see x2vlm.data.samples). Rank and world
        size default to the process group's (or the launcher's variables)."""
        self.shards = expand_shards(shards)
        self.decode = decode
        self.seed, self.infinite, self.shuffle = seed, infinite, shuffle
        env_rank, env_world = env_rank_world()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        self.epoch = 0  # first epoch of a stream that has no start position
        self.start: dict[int, tuple[int, int, int]] = {}
        self.worker_offset = 0  # DataLoader worker i reads as worker (i + offset) % workers
        if num_workers is not None:
            self.check_enough(num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, positions: dict, worker_offset: int = 0) -> None:
        """Begin each worker at its saved position {worker: (epoch, shard, sample)}; DataLoader worker i then plays
        worker (i + worker_offset) % workers, so that batches keep coming in the order they came before."""
        self.start = {int(w): tuple(int(x) for x in p) for w, p in positions.items()}
        self.worker_offset = worker_offset

    def check_enough(self, num_workers: int) -> None:
        workers = max(1, num_workers)
        total = self.world_size * workers
        if len(self.shards) < total:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {workers} workers; "
                             f"write at least {total} shards (or use fewer workers)")

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list:
        """The shards that one worker of this rank reads in an epoch."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        total = self.world_size * num_workers
        return order[self.rank * num_workers + worker::total]

    def read_shard(self, path: str, epoch: int, shard: int, first: int):
        """Items of one shard from its sample number `first` on, in this epoch's order."""
        name = zlib.crc32(os.path.basename(path).encode("utf-8"))
        try:
            tar = tarfile.open(path, "r:*")
        except (OSError, EOFError, tarfile.TarError):  # missing or unreadable: counted once, when the shard begins
            if first == 0:
                yield {"_skipped": {"bad_shard": 1}, "_pos": (epoch, shard + 1, 0)}
            return
        with tar:
            samples, damaged = tar_index(tar, path)
            if damaged and first == 0:
                yield {"_skipped": {"bad_shard": 1}, "_pos": (epoch, shard, 0)}
            order = list(range(len(samples)))
            if self.shuffle:
                np.random.default_rng([self.seed, epoch, name]).shuffle(order)
            for j in range(first, len(order)):
                key, members = samples[order[j]]
                pos = (epoch, shard, j + 1) if j + 1 < len(order) else (epoch, shard + 1, 0)
                try:
                    files = {ext: tar.extractfile(m).read() for ext, m in members}
                except (OSError, EOFError, tarfile.TarError):
                    yield {"_skipped": {"bad_shard": 1}, "_pos": pos}
                    continue
                sample, bad = self.decode(key, files, np.random.default_rng([self.seed, epoch, name, order[j]]))
                item = {"_skipped": bad} if sample is None else (dict(sample, _skipped=bad) if bad else sample)
                item["_pos"] = pos
                yield item

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        self.check_enough(num_workers)
        worker = (worker + self.worker_offset) % num_workers
        epoch, shard, sample = self.start.get(worker, (self.epoch, 0, 0))
        while True:
            paths = self.shards_for(epoch, worker, num_workers)
            for s in range(shard, len(paths)):
                yield from self.read_shard(paths[s], epoch, s, sample if s == shard else 0)
            if not self.infinite:
                return
            epoch, shard, sample = epoch + 1, 0, 0
