"""WebDataset shards: finding them, writing them, and reading them by position across ranks and loader workers.

Writing: `ShardWriter` puts records ({"__key__", extension: bytes, ...}) into numbered tar files, each written
under a temporary name and renamed when complete; tar members carry a fixed time, so equal records give equal
bytes. What the records hold is x2vlm.data.samples' business.

Shards are local tar files (paths, globs, brace patterns, folders) or remote: "pipe:CMD" (the tar on the standard
output of a shell command, e.g. "pipe:curl -sL URL") and http(s) URLs, brace patterns included.

Reading (`ShardStream`): every epoch all ranks shuffle the shard list with the same seed (seed + epoch). With at
least as many shards as readers (T = ranks x loader workers), global worker g = rank * workers + worker reads
shards g, g + T, g + 2T, ...; with fewer, every worker reads every shard and keeps every T-th sample of it (which
ones rotates from shard to shard). Either way no sample of an epoch is read twice or missed. A worker keeps
`open_shards` of its shards open and draws each next sample from one of them at random, so that a batch mixes
shards even when each shard was written in crawl or source order. A local shard's samples are found by its tar
index (headers only) and read by seeking, in a random order per shard and epoch. A remote shard is streamed in
its stored order; with a cache folder it is downloaded once and then read like a local shard.

A decoder turns a sample's files into a sample; bad input is skipped and counted: the stream then yields
{"_skipped": {kind: count}} without a "key" in place of the sample, so that the counts reach the main process
through DataLoader workers. A missing, unreadable or truncated shard counts as "bad_shard" once per epoch (the
samples before the damage are used).
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import http.client
import os
import random
import re
import subprocess
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand

from x2vlm.config import ConfigError
from x2vlm.distributed import env_rank_world
from x2vlm.logs import log

REMOTE_PREFIXES = ("pipe:", "http://", "https://")
TAR_MTIME = 946684800  # 2000-01-01: every member of a written shard carries this time
READ_ERRORS = (OSError, EOFError, tarfile.TarError, http.client.HTTPException)


def is_remote(path) -> bool:
    """Whether a shard is read from a command or a URL rather than a local file."""
    return str(path).startswith(REMOTE_PREFIXES)


def expand_shards(patterns) -> list:
    """Paths, globs, brace patterns ("data/train-{000000..000009}.tar"), folders (their *.tar) and remote shards
    ("pipe:CMD", http(s) URLs; brace patterns expand, nothing is fetched) -> sorted, de-duplicated shards. Raises
    FileNotFoundError naming any local pattern that matches nothing."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        for p in braceexpand(str(pattern)):
            if is_remote(p):
                if p.startswith(("http://", "https://")) and glob.has_magic(p):
                    raise FileNotFoundError(f"{p!r}: a URL cannot be a glob (list its shards with a brace pattern)")
                found = [p]
            elif os.path.isdir(p):
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
            self.writer, self.count = wds.TarWriter(self.stream, encoder=False, mtime=TAR_MTIME), 0
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


def require_existing(shards, where: str) -> None:
    """`shards` name shards that exist (a ConfigError starting with `where` otherwise); remote shards are not
    contacted here."""
    if not shards:
        raise ConfigError(f"{where} names no shards")
    try:
        expand_shards(shards)
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: {e}") from None


def require_shards(sources) -> None:
    """Every data source names shards that exist (ConfigError naming the source otherwise)."""
    for i, s in enumerate(sources):
        require_existing(s.shards, f"data.sources.{i}.shards: source {s.name!r}")


def check_resumable(data_cfg) -> None:
    """ConfigError unless every source can continue exactly from a saved position: remote shards need
    data.remote_cache (a streamed shard cannot be entered in the middle)."""
    if data_cfg.remote_cache:
        return
    for i, s in enumerate(data_cfg.sources):
        remote = [p for p in s.shards if is_remote(p)]
        if remote:
            raise ConfigError(f"data.sources.{i}.shards: source {s.name!r} streams remote shards ({remote[0]!r}), "
                              f"which cannot be resumed exactly; set data.remote_cache=DIR (each shard is "
                              f"downloaded once and read by index) before starting a run you want to resume")


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


# --- remote shards ---------------------------------------------------------------------------------------------

class RemoteFile:
    """The bytes of a remote shard as a stream: "pipe:CMD" runs CMD in a shell and reads its standard output; an
    http(s) URL is fetched. `finish()` reads to the end and raises OSError when the command failed; `close()`
    stops early."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url, self.proc = url, None
        if url.startswith("pipe:"):
            self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
            self.file = self.proc.stdout
        else:
            self.file = urllib.request.urlopen(url, timeout=timeout)

    def finish(self) -> None:
        while self.file.read(1 << 16):  # (a tar's padding after its end marker; a command then exits cleanly)
            pass
        self.file.close()
        if self.proc is not None and self.proc.wait() != 0:
            raise OSError(f"{self.url}: the command exited with status {self.proc.returncode}")

    def close(self) -> None:
        self.file.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


def cached_copy(url: str, cache_dir: str) -> str:
    """A local copy of a remote shard in `cache_dir`, downloaded whole on first use (under a temporary name,
    renamed when complete; processes that want the same shard wait for one download). Raises OSError when the
    download fails."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    path = os.path.join(cache_dir, f"{hashlib.sha1(url.encode('utf-8')).hexdigest()[:16]}-{base}")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            tmp = f"{path}.partial.{os.getpid()}"
            try:
                src = RemoteFile(url)
                try:
                    with open(tmp, "wb") as dst:
                        while chunk := src.file.read(1 << 20):
                            dst.write(chunk)
                    src.finish()
                finally:
                    src.close()
                os.replace(tmp, path)
            except READ_ERRORS as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise OSError(f"{url}: download failed: {e}") from None
    return path


# --- one open shard of a worker --------------------------------------------------------------------------------

class LocalShard:
    """The samples of a local shard that one worker reads in one epoch, taken one by one by seeking."""

    def __init__(self, tar: tarfile.TarFile, samples: list, sequence: list, index: int, name: int, taken: int):
        self.tar, self.samples, self.sequence = tar, samples, sequence
        self.index, self.name, self.taken = index, name, taken

    @property
    def done(self) -> bool:
        return self.taken >= len(self.sequence)

    def take(self):
        """(sample number in the tar, key, files or None when they cannot be read, {kind: count})."""
        num = self.sequence[self.taken]
        self.taken += 1
        key, members = self.samples[num]
        try:
            return num, key, {ext: self.tar.extractfile(m).read() for ext, m in members}, {}
        except (OSError, EOFError, tarfile.TarError):
            return num, key, None, {}

    def close(self) -> None:
        self.tar.close()


class StreamedShard:
    """The samples of a remote shard that one worker reads in one epoch, in stored order (every `stride`-th from
    `offset`), read one ahead so that the end is known when the last one is taken. Damage (a read error, a
    command that fails) ends the shard: the sample it cut is dropped and "bad_shard" is counted by the worker
    whose `offset` is 0."""

    def __init__(self, url: str, index: int, name: int, offset: int, stride: int):
        self.index, self.name, self.offset, self.stride = index, name, offset, stride
        self.taken, self.number, self.carry, self.ended = 0, -1, None, False
        self.skipped: dict = {}
        self.remote = RemoteFile(url)
        try:
            self.tar = tarfile.open(fileobj=self.remote.file, mode="r|*")
        except BaseException:
            self.remote.close()
            raise
        self.members = iter(self.tar)
        self.pending = self.read_ahead()

    @property
    def done(self) -> bool:
        return self.pending is None

    def read_sample(self):
        """(key, files) of the next sample in stored order, or None at the end or at damage."""
        key, files = None, {}
        while True:
            if self.carry is not None:
                (k, ext), data = self.carry
                self.carry = None
            else:
                try:
                    member = next(self.members)
                    if not member.isfile():
                        continue
                    data = self.tar.extractfile(member).read()
                except StopIteration:
                    self.end(damaged=False)
                    return (key, files) if key is not None else None
                except READ_ERRORS:
                    self.end(damaged=True)
                    return None
                k, ext = member_key(member)
            if key is not None and k != key:
                self.carry = ((k, ext), data)
                return key, files
            key = k
            files[ext] = data

    def end(self, damaged: bool) -> None:
        if not self.ended:
            self.ended = True
            try:
                self.remote.finish()
            except READ_ERRORS:
                damaged = True
        if damaged and self.offset == 0:
            self.skipped["bad_shard"] = 1

    def read_ahead(self):
        while not self.ended or self.carry is not None:
            sample = self.read_sample()
            if sample is None:
                return None
            self.number += 1
            if self.number % self.stride == self.offset:
                return (self.number, *sample)
        return None

    def take(self):
        num, key, files = self.pending
        self.taken += 1
        self.pending = self.read_ahead()
        skipped, self.skipped = self.skipped, {}
        return num, key, files, skipped

    def close(self) -> None:
        self.remote.close()


def _draw(*numbers: int, n: int) -> int:
    """A number in 0..n-1, a pure function of `numbers` (cheaper than seeding a generator per draw)."""
    digest = hashlib.blake2b(",".join(map(str, numbers)).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def start_position(epoch: int) -> dict:
    return {"epoch": epoch, "next": 0, "open": [], "drawn": 0}


def as_position(p) -> dict:
    """A saved position as a dict {"epoch", "next", "open", "drawn"}; also reads the older (epoch, shard, sample)
    form (one shard open at a time), so that such checkpoints continue without reading anything twice."""
    if isinstance(p, dict) and "open" in p:
        return {"epoch": int(p["epoch"]), "next": int(p["next"]), "open": [[int(s), int(j)] for s, j in p["open"]],
                "drawn": int(p["drawn"])}
    epoch, shard, sample = (p["epoch"], p["shard"], p["sample"]) if isinstance(p, dict) else p
    if int(sample) == 0:
        return {"epoch": int(epoch), "next": int(shard), "open": [], "drawn": 0}
    return {"epoch": int(epoch), "next": int(shard) + 1, "open": [[int(shard), int(sample)]], "drawn": 0}


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples of shards, split across ranks and DataLoader workers; bad input skipped and counted.

    infinite=True repeats epochs forever (training); False reads one pass (evaluation). With shuffle, every epoch
    has its own shard order (the same on all ranks) and each local shard is read in its own random sample order;
    shuffle=False keeps the shard and sample order (use open_shards=1 then). `open_shards` shards of a worker are
    open at once; each sample is drawn from one of them at random.

    The order is a pure function of (seed, epoch, rank, worker), so a reader's place is a small JSON-able dict, a
    position: {"epoch", "next": the next shard of this worker's list to open, "open": [[shard, taken], ...] the
    open shards (their index in the list, how many of their samples were taken), "drawn": samples drawn this
    epoch}. Every item carries "_pos", the position after it; `start` {worker: position} makes the stream begin
    there, with no data read and discarded. Each sample's random numbers (e.g. frame offsets) come from a
    generator keyed by (seed, epoch, shard file, sample), the same whichever rank or worker reads it. Items
    without "key" carry only "_skipped" counts. Remote shards are streamed and cannot be entered in the middle:
    resume_at refuses them unless `cache_dir` is given.
    """

    def __init__(self, shards, decode, seed: int = 0, infinite: bool = True, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None, num_workers: int | None = None,
                 open_shards: int = 1, cache_dir: str = ""):
        """`decode(key, files, rng)` -> (sample or None, {kind: count}) (see x2vlm.data.samples). Rank and world
        size default to the process group's (or the launcher's variables)."""
        self.shards = expand_shards(shards)
        self.decode = decode
        self.seed, self.infinite, self.shuffle = seed, infinite, shuffle
        if open_shards < 1:
            raise ValueError(f"open_shards: expected a positive number, got {open_shards}")
        self.open_shards, self.cache_dir = open_shards, cache_dir
        env_rank, env_world = env_rank_world()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        self.epoch = 0  # first epoch of a stream that has no start position
        self.start: dict[int, dict] = {}
        self.worker_offset = 0  # DataLoader worker i reads as worker (i + offset) % workers
        if num_workers is not None and self.split_samples(num_workers):
            total = self.world_size * max(1, num_workers)
            log.info(f"{len(self.shards)} shard(s) for {self.world_size} rank(s) x {max(1, num_workers)} loader "
                     f"worker(s): every worker reads every shard and keeps every {total}-th sample (write at least "
                     f"{total} shards to give each worker shards of its own)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, positions: dict, worker_offset: int = 0) -> None:
        """Begin each worker at its saved position {worker: position}; DataLoader worker i then plays worker
        (i + worker_offset) % workers, so that batches keep coming in the order they came before."""
        remote = [p for p in self.shards if is_remote(p)]
        if remote and not self.cache_dir:
            raise ConfigError(f"data.remote_cache: remote shards ({remote[0]!r}, ...) are streamed and cannot be "
                              f"resumed exactly; set data.remote_cache=DIR (each shard is downloaded once and read by "
                              f"index) when starting a run you want to resume")
        self.start = {int(w): as_position(p) for w, p in positions.items()}
        self.worker_offset = worker_offset

    def split_samples(self, num_workers: int) -> bool:
        """Whether there are fewer shards than readers, so that the readers share each shard's samples."""
        return len(self.shards) < self.world_size * max(1, num_workers)

    def plan(self, epoch: int, worker: int, num_workers: int) -> list:
        """[(shard, offset, stride)] that one worker of this rank reads in an epoch: of each shard's samples (in
        the epoch's order) those at offset, offset + stride, ..."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        total = self.world_size * num_workers
        g = self.rank * num_workers + worker
        if not self.split_samples(num_workers):
            return [(path, 0, 1) for path in order[g::total]]
        return [(path, (g + i) % total, total) for i, path in enumerate(order)]

    def open_shard(self, part: tuple, epoch: int, index: int, taken: int, fresh: bool):
        """(the open shard or None when nothing of it is left to read, {kind: count}). A damaged shard is counted
        when it is first opened in an epoch, by the worker that reads its samples from offset 0."""
        path, offset, stride = part
        name = zlib.crc32(os.path.basename(path.rstrip("/")).encode("utf-8"))
        counts = {"bad_shard": 1} if offset == 0 else {}
        if is_remote(path) and not self.cache_dir:
            try:
                shard = StreamedShard(path, index, name, offset, stride)
            except READ_ERRORS:
                return None, counts
            if shard.done:
                shard.close()
                return None, shard.skipped if fresh else {}
            return shard, {}
        try:
            local = cached_copy(path, self.cache_dir) if is_remote(path) else path
            tar = tarfile.open(local, "r:*")
        except (OSError, EOFError, tarfile.TarError):  # missing, unreadable, or a download that failed
            return None, counts
        samples, damaged = tar_index(tar, local)
        order = list(range(len(samples)))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch, name]).shuffle(order)
        sequence = order[offset::stride]
        skipped = counts if damaged and fresh else {}
        if taken >= len(sequence):
            tar.close()
            return None, skipped
        return LocalShard(tar, samples, sequence, index, name, taken), skipped

    def read_epoch(self, epoch: int, worker: int, num_workers: int, start: dict):
        """Items of one worker's epoch from position `start` on."""
        plan = self.plan(epoch, worker, num_workers)
        g = self.rank * num_workers + worker
        nxt, drawn, shards = start["next"], start["drawn"], []

        def position() -> dict:
            return {"epoch": epoch, "next": nxt, "open": [[s.index, s.taken] for s in shards], "drawn": drawn}

        try:
            restored: dict = {}
            for index, taken in start["open"]:
                shard, bad = self.open_shard(plan[index], epoch, index, taken, fresh=False)
                _add(restored, bad)
                if shard is not None:
                    shards.append(shard)
            if restored:
                yield {"_skipped": restored, "_pos": position()}
            while True:
                while len(shards) < self.open_shards and nxt < len(plan):
                    shard, bad = self.open_shard(plan[nxt], epoch, nxt, 0, fresh=True)
                    nxt += 1
                    if shard is not None:
                        shards.append(shard)
                    if bad:
                        yield {"_skipped": bad, "_pos": position()}
                if not shards:
                    return
                i = _draw(self.seed, epoch, g, drawn, n=len(shards)) if len(shards) > 1 else 0
                drawn += 1
                shard = shards[i]
                num, key, files, bad = shard.take()
                if shard.done:
                    shard.close()
                    shards.pop(i)
                if files is None:
                    item = {"_skipped": _add(bad, {"bad_shard": 1})}
                else:
                    sample, more = self.decode(key, files, np.random.default_rng([self.seed, epoch, shard.name, num]))
                    _add(bad, more)
                    item = {"_skipped": bad} if sample is None else (dict(sample, _skipped=bad) if bad else sample)
                item["_pos"] = position()
                yield item
        finally:
            for s in shards:
                s.close()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.worker_offset) % num_workers
        position = self.start.get(worker, start_position(self.epoch))
        while True:
            yield from self.read_epoch(position["epoch"], worker, num_workers, position)
            if not self.infinite:
                return
            position = start_position(position["epoch"] + 1)


def _add(total: dict, counts: dict) -> dict:
    for kind, n in counts.items():
        total[kind] = total.get(kind, 0) + n
    return total
