"""Reading shards: several open shards per worker mixed in every batch, exact positions (a stream started at any
saved position continues with the same items), fewer shards than readers, and remote shards (a `pipe:` command
and an http URL served on loopback by the test) streamed, cached, and refused for resume when streamed."""
import functools
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from x2vlm.config import ConfigError, DataConfig, LossConfig, SourceConfig, load_config
from x2vlm.data.pipeline import build_loader
from x2vlm.data.shards import ShardStream, as_position, check_resumable, expand_shards


def decode(key, files, rng):
    """A decoder without images: the sample's text, and a random number from its generator."""
    text = files.get("txt", b"").decode()
    if text == "bad":
        return None, {"bad_json": 1}
    return {"key": key, "text": text, "draw": float(rng.random())}, {}


def write_source_ordered(root: Path, shards: int, per: int, prefix: str = "src") -> list:
    """Shards written in source order: shard i holds only samples of source i ("{prefix}{i}_{n}")."""
    paths = []
    for i in range(shards):
        path = root / f"{prefix}-{i:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for n in range(per):
                w.write({"__key__": f"{prefix}{i}_{n:03d}", "txt": f"source {i}".encode()})
        paths.append(str(path))
    return paths


def items(stream, n=None):
    out = []
    if n == 0:
        return out
    for item in stream:
        out.append(item)
        if n is not None and len(out) == n:
            break
    return out


def view(item):
    return item.get("key"), item.get("draw"), item.get("_skipped"), item["_pos"]


def test_open_shards_mix_every_batch(tmp_path):
    paths = write_source_ordered(tmp_path, 8, 12)
    one = [i["key"] for i in items(ShardStream(paths, decode, seed=1, infinite=False, rank=0, world_size=1))]
    mixed = [i["key"] for i in items(ShardStream(paths, decode, seed=1, infinite=False, rank=0, world_size=1,
                                                 open_shards=4))]
    assert sorted(one) == sorted(mixed) == sorted(f"src{i}_{n:03d}" for i in range(8) for n in range(12))
    sources = lambda keys: len({k.split("_")[0] for k in keys})  # noqa: E731
    batches = lambda keys: [keys[i:i + 8] for i in range(0, 96, 8)]  # noqa: E731
    assert max(sources(b) for b in batches(one)) <= 2  # one shard at a time: a batch is one or two sources
    assert min(sources(b) for b in batches(mixed)[:10]) >= 3  # four open shards: every batch mixes sources
    # through a loader with 2 workers, each with its own 4 shards open: the first 8 samples of each worker mix them
    stream = ShardStream(paths, decode, seed=3, rank=0, world_size=1, num_workers=2, open_shards=4)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    keys = [i["key"] for i in items(loader, 16)]
    assert sources(keys[0::2][:8]) >= 3 and sources(keys[1::2][:8]) >= 3


def damaged_set(root: Path) -> list:
    """Eight shards of unequal sizes with damage: a bad sample, a missing shard, a truncated shard."""
    paths = []
    for i, per in enumerate([5, 9, 3, 7, 11, 4, 6, 8]):
        path = root / f"dmg-{i:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for n in range(per):
                w.write({"__key__": f"d{i}_{n:03d}", "txt": b"bad" if (i, n) == (1, 4) else f"{i} {n}".encode()})
        paths.append(str(path))
    data = Path(paths[4]).read_bytes()
    Path(paths[4]).write_bytes(data[:5000])  # 4 whole samples and part of the 5th
    Path(paths[6]).unlink()  # vanishes after the list was made
    return paths


@pytest.mark.parametrize("open_shards, world", [(1, 1), (3, 1), (4, 2), (2, 12)])  # 12: fewer shards than readers
def test_a_stream_started_at_any_saved_position_continues_exactly(tmp_path, open_shards, world):
    paths = damaged_set(tmp_path)
    existing = [p for p in paths if Path(p).exists()]

    def stream(rank, start=None):
        s = ShardStream(existing, decode, seed=5, rank=rank, world_size=world, open_shards=open_shards)
        s.shards = paths  # one shard is gone already: keep it in the list, as a run that found it would
        if start is not None:
            s.resume_at({0: start})
        return s

    for rank in sorted({0, world // 2, world - 1}):
        whole = items(stream(rank), 150)  # over three epochs
        epochs = {i["_pos"]["epoch"] for i in whole}
        assert len(epochs) >= 3
        for cut in list(range(0, 150, 7)) + [149]:
            saved = json.loads(json.dumps(whole[cut]["_pos"]))  # a position survives JSON as it is
            assert len(saved["open"]) <= open_shards
            again = items(stream(rank, saved), 150 - cut - 1)
            assert [view(i) for i in again] == [view(i) for i in whole[cut + 1:]], (rank, cut)
    counts = Counter()
    for i in items(stream(0), 150):
        counts.update(i.get("_skipped", {}))
    if world == 1:
        assert counts["bad_json"] >= 2 and counts["bad_shard"] >= 4  # two per epoch: the missing and the cut shard


def test_older_positions_continue(tmp_path):
    paths = write_source_ordered(tmp_path, 3, 4)
    whole = items(ShardStream(paths, decode, seed=0, rank=0, world_size=1), 12)
    assert as_position((0, 1, 2)) == {"epoch": 0, "next": 2, "open": [[1, 2]], "drawn": 0}
    s = ShardStream(paths, decode, seed=0, rank=0, world_size=1)
    s.resume_at({0: {"worker": 0, "epoch": 0, "shard": 1, "sample": 2, "batch": 3}})  # a saved batch position
    assert [i["key"] for i in items(s, 6)] == [i["key"] for i in whole[6:12]]


def test_fewer_shards_than_readers_share_samples(tmp_path):
    paths = damaged_set(tmp_path)[:3]  # 5 + 9 + 3 samples, one of them bad, for 2 ranks x 3 workers
    seen, skipped = [], Counter()
    for rank in range(2):
        stream = ShardStream(paths, decode, seed=1, infinite=False, rank=rank, world_size=2, num_workers=3,
                             open_shards=2)
        for item in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=3):
            skipped.update(item.get("_skipped", {}))
            if "key" in item:
                seen.append(item["key"])
    assert sorted(seen) == sorted(f"d{i}_{n:03d}" for i, per in enumerate([5, 9, 3]) for n in range(per)
                                  if (i, n) != (1, 4))
    assert skipped == {"bad_json": 1}
    # a missing shard among too few is counted once, not once per reader
    gone = paths[:2] + [str(tmp_path / "gone.tar")]
    total = Counter()
    for rank in range(2):
        for w in range(3):
            s = ShardStream(paths[:2], decode, seed=1, infinite=False, rank=rank, world_size=2)
            s.shards = gone
            for item in s.read_epoch(0, w, 3, {"epoch": 0, "next": 0, "open": [], "drawn": 0}):
                total.update(item.get("_skipped", {}))
    assert total["bad_shard"] == 1


@pytest.fixture
def served(tmp_path):
    """An http server on loopback for the test's shards folder; stopped at the end of the test, or by itself
    after a minute."""
    folder = tmp_path / "www"
    folder.mkdir()

    requests = Counter()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    timer = threading.Timer(60, server.shutdown)
    timer.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", requests
    timer.cancel()
    server.shutdown()
    server.server_close()


def test_remote_shards_stream_and_cache(tmp_path, served):
    folder, url, requests = served
    paths = write_source_ordered(folder, 4, 6, prefix="web")
    local = write_source_ordered(tmp_path, 1, 6, prefix="local")
    data = Path(paths[3]).read_bytes()
    Path(paths[3]).write_bytes(data[:7000])  # served cut short: the samples before the cut are read
    shards = [f"{url}/web-{{000000..000002}}.tar", f"pipe:cat {paths[3]}", f"{url}/missing.tar",
              f"pipe:cat {tmp_path}/missing.tar", local[0]]
    assert len(expand_shards(shards)) == 7
    with pytest.raises(FileNotFoundError, match="a URL cannot be a glob"):
        expand_shards(f"{url}/web-*.tar")
    want = {f"web{i}_{n:03d}" for i in range(3) for n in range(6)} | {f"local0_{n:03d}" for n in range(6)}
    got, skipped = Counter(), Counter()
    stream = ShardStream(shards, decode, seed=2, infinite=False, rank=0, world_size=1, open_shards=3)
    for item in stream:
        skipped.update(item.get("_skipped", {}))
        if "key" in item:
            got[item["key"]] += 1
    cut = {k for k in got if k.startswith("web3_")}
    assert set(got) - cut == want and 0 < len(cut) < 6 and set(got.values()) == {1}
    assert skipped == {"bad_shard": 3}  # the missing URL, the failing command, the cut shard
    # streamed shards cannot be resumed; with a cache they are downloaded once and resume exactly
    with pytest.raises(ConfigError, match="data.remote_cache"):
        stream.resume_at({0: {"epoch": 0, "next": 1, "open": [], "drawn": 0}})
    cfg = load_config("tiny", [f"data.sources.0.shards=[{url}/web-000000.tar]"])
    with pytest.raises(ConfigError, match="data.sources.0.shards: source 'images' streams remote shards"):
        check_resumable(cfg.data)
    check_resumable(load_config("tiny", [f"data.sources.0.shards=[{url}/web-000000.tar]",
                                         f"data.remote_cache={tmp_path}/cache"]).data)
    cache = str(tmp_path / "cache")

    def cached(start=None):
        s = ShardStream(shards, decode, seed=2, rank=0, world_size=1, open_shards=3, cache_dir=cache)
        if start is not None:
            s.resume_at({0: start})
        return s

    whole = items(cached(), 60)
    assert {i["key"] for i in whole[:30] if "key" in i} >= want
    for cut in (4, 17, 33):
        assert [view(i) for i in items(cached(whole[cut]["_pos"]), 20)] == [view(i) for i in whole[cut + 1:cut + 21]]
    assert len(list((tmp_path / "cache").glob("*-web-00000[0-2].tar"))) == 3
    assert all(requests[f"/web-{i:06d}.tar"] == 2 for i in range(3))  # streamed once, then downloaded once


def test_loader_takes_open_shards_from_the_config(tmp_path):
    from x2vlm.data.samples import write_shards
    from x2vlm.data.tokenizer import train_tokenizer
    from x2vlm.demo.shapesworld import corpus, generate

    samples = generate("train", 24, seed=2, image_size=32)
    for i, s in enumerate(samples):
        s["key"] = f"g{i // 6}_{i % 6}"
    paths = write_shards(samples, str(tmp_path / "s"), "train", 6)
    tok = train_tokenizer(corpus(samples), str(tmp_path / "tok"))
    src = SourceConfig(name="x", kind="image", shards=paths, batch_size=4)
    groups = {}
    for open_shards in (1, 4):
        loader = build_loader(src, DataConfig(num_workers=0, open_shards=open_shards), tok, 32, 16, LossConfig(),
                              seed=0)
        it = iter(loader)
        groups[open_shards] = [len({k.split("_")[0] for k in next(it)["keys"]}) for _ in range(6)]
    assert max(groups[1]) <= 2 and np.mean(groups[4]) > np.mean(groups[1])
