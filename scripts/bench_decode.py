"""Benchmark: 1-fps decoding per backend and seek mode against decoding every frame with PyAV, in the same run,
on clips at the encoder's default keyframe interval and the same clips re-encoded with a keyframe every second;
then decode throughput of the real training loader, in frames per second per loader worker.

    python scripts/bench_decode.py            # 2 clips of 60 s, 30 fps, 320x240, H.264 (libx264 default GOP)
    python scripts/bench_decode.py --quick    # 1 clip of 8 s, 25 fps, 160x128, fewer loader batches

Each frame shows its own index (video.indexcode) in its top half, above a textured band that scrolls 2 px per
frame (real motion for the encoder). Every method reads each clip at 1 fps with max_frames=None, and again with
max_frames=8. A method is exact when every frame it returns is the frame on screen at its sample time; for the
keyframe mode the benchmark checks instead that each frame is the one at the time it reports (`shown`), and
gives the mean |shown - sample time|. Baselines, both PyAV decoding every frame in order and then picking frames
by timestamp: decode_all converts only the picked frames to RGB (the cheapest way to decode everything);
decode_all_rgb converts every decoded frame first (a plain "decode the clip to an array" reader).
decord_plain is decord used directly (its frame times and one get_batch), without the checks of the "decord"
backend; the exact-mode target is measured against it.
Times are medians over --repeats runs per clip (the methods taking turns), summed over clips; ratios are
against the baselines of this run.
The last line printed is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from video.decode import DEFAULT_BACKEND, DEFAULT_KEYFRAME_TOLERANCE, available_backends, read_clip  # noqa: E402
from video.encode import encode_video, reencode  # noqa: E402
from video.indexcode import index_frame, read_index  # noqa: E402
from video.sampling import frame_index_at, sample_timestamps, timeline_duration  # noqa: E402


def clip_frames(n: int, height: int, width: int, seed: int):
    """n frames: the frame index in the top half, a scrolling blocky texture in the bottom half."""
    rng = np.random.default_rng(seed)
    half = height // 2
    coarse = rng.integers(0, 256, size=(half // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height - half]
    for i in range(n):
        frame = np.empty((height, width, 3), np.uint8)
        frame[:half] = index_frame(i, half, width)
        frame[half:] = np.roll(texture, 2 * i, axis=1)[:, :width]
        yield frame


def decode_all(data: bytes, max_frames, convert_all: bool):
    """Baseline: PyAV decodes every frame in order, then frames are picked by the same timestamp rule.
    Returns (frames, sample times, start time of each picked frame)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = [(frame.pts, frame.to_ndarray(format="rgb24") if convert_all else frame)
                   for frame in container.decode(stream)]
        tb = float(stream.time_base)
    decoded.sort(key=lambda item: item[0])
    starts = np.array([pts for pts, _ in decoded], dtype=np.float64) * tb
    starts -= starts[0]
    times = sample_timestamps(timeline_duration(starts), 1.0, max_frames)
    idx = frame_index_at(starts, times)
    picked = [decoded[i][1] for i in idx]
    if not convert_all:
        picked = [frame.to_ndarray(format="rgb24") for frame in picked]
    return np.stack(picked), times, starts[idx]


def decord_plain(data: bytes, max_frames):
    """decord used directly, as video pipelines do: its frame times, one get_batch, none of our checks."""
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    starts = np.asarray(vr.get_frame_timestamp(range(len(vr))), dtype=np.float64)[:, 0]
    starts -= starts[0]
    times = sample_timestamps(timeline_duration(starts), 1.0, max_frames)
    idx = frame_index_at(starts, times)
    uniq = sorted(set(idx.tolist()))
    batch = vr.get_batch(uniq).asnumpy()
    pos = {i: k for k, i in enumerate(uniq)}
    return batch[[pos[i] for i in idx]], times, starts[idx]


def reader(backend: str, **kw):
    def read(data, max_frames):
        clip = read_clip(data, fps=1.0, max_frames=max_frames, backend=backend, **kw)
        return clip.frames, clip.times, clip.shown
    return read


def check(outputs, fps: float, height: int) -> dict:
    """Exactness and time error of one method's outputs [(frames, sample times, shown times)] over the clips."""
    exact, truthful, errors, distinct, n_out = True, True, [], [], 0
    for frames, times, shown in outputs:
        n_out += len(frames)
        idx = [read_index(f[:height // 2]) for f in frames]
        exact = exact and idx == [int(np.floor(t * fps + 1e-9)) for t in times]
        truthful = truthful and idx == [int(round(s * fps)) for s in shown]  # each frame is where it says
        errors += np.abs(np.asarray(shown) - np.asarray(times)).tolist()
        distinct.append(len(set(idx)) / len(idx))
    return {"frames": n_out, "exact_frames": exact, "shown_times_correct": truthful,
            "mean_time_error_s": round(float(np.mean(errors)), 4),
            "distinct_frames": round(float(np.mean(distinct)), 3)}


def bench_clips(clips, args, methods) -> dict:
    """{budget: {method: result}}: per clip, the methods take turns in every repeat (so that load from other
    processes falls on all of them alike); seconds are the per-clip medians summed over clips, and speedups
    are against the baselines of this run."""
    out = {}
    for max_frames in (None, 8):
        outputs = {name: [] for name in methods}
        runs = {name: [] for name in methods}  # [clip][repeat] seconds
        for data in clips:
            for name, fn in methods.items():  # warm-up (imports, codec set-up), and the output that is checked
                outputs[name].append(fn(data, max_frames))
                runs[name].append([])
            for _ in range(args.repeats):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    fn(data, max_frames)
                    runs[name][-1].append(time.perf_counter() - t0)
        seconds = {name: sum(statistics.median(r) for r in per_clip) for name, per_clip in runs.items()}
        res = {}
        for name in methods:
            r = check(outputs[name], args.fps, args.height)
            r["seconds"] = round(seconds[name], 4)
            r["fps_decoded"] = round(r["frames"] / seconds[name], 1)
            r["speedup_vs_decode_all"] = round(seconds["decode_all"] / seconds[name], 2)
            r["speedup_vs_decode_all_rgb"] = round(seconds["decode_all_rgb"] / seconds[name], 2)
            res[name] = r
        out["all" if max_frames is None else f"max_frames_{max_frames}"] = res
    return out


def print_table(title: str, table: dict) -> None:
    print(f"\n{title}", file=sys.stderr)
    print(f"{'method':<22}{'samples':>12}{'frames':>7}{'seconds':>9}{'fps':>8}{'x all':>8}{'x all_rgb':>10}"
          f"{'exact':>7}{'err s':>8}{'distinct':>9}", file=sys.stderr)
    for budget, res in table.items():
        for name, r in res.items():
            print(f"{name:<22}{budget:>12}{r['frames']:>7}{r['seconds']:>9.3f}{r['fps_decoded']:>8.1f}"
                  f"{r['speedup_vs_decode_all']:>8.2f}{r['speedup_vs_decode_all_rgb']:>10.2f}"
                  f"{str(r['exact_frames']):>7}{r['mean_time_error_s']:>8.3f}{r['distinct_frames']:>9.2f}",
                  file=sys.stderr)


def loader_throughput(clips60: dict, batches: int, demo_clips: int) -> dict:
    """Frames per second of one loader worker of the real training pipeline (x2vlm.data.pipeline.build_loader,
    a "video" source, exact seeking): for the demo's video source (ShapesWorld clips, 4 s, 8 fps, 64x64,
    max_frames 4, image size 64) and for the benchmark's long clips (max_frames 8, image size 224)."""
    import torch

    from x2vlm.data.samples import write_video_shards
    from x2vlm.config import DataConfig, LossConfig, SourceConfig
    from x2vlm.data.pipeline import build_loader
    from x2vlm.demo.shapesworld_video import generate_clips, shard_samples, video_corpus
    from x2vlm.data.tokenizer import train_tokenizer

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo = generate_clips("train", demo_clips, seed=0, size=64)
        tok = train_tokenizer(video_corpus(demo) + ["a texture scrolls to the left"], os.path.join(tmp, "tok"))
        sets = {"demo": (write_video_shards(shard_samples(demo), tmp, "demo", per_shard=max(1, demo_clips // 4)),
                         4, 64)}
        for name, datas in clips60.items():
            samples = [{"key": f"clip{i}", "video": d, "json": {"caption": "a texture scrolls to the left"}}
                       for i, d in enumerate(datas)]
            sets[name] = (write_video_shards(samples, tmp, name, per_shard=1), 8, 224)
        for name, (shards, max_frames, size) in sets.items():
            source = SourceConfig(name=name, kind="video", shards=shards, batch_size=8, fps=1.0,
                                  max_frames=max_frames)
            loader = build_loader(source, DataConfig(sources=[source], num_workers=1), tok, size, 40, LossConfig(),
                                  seed=0, train=True, rank=0, world_size=1)
            it = iter(loader)
            next(it)  # the worker's start and first batch are not measured
            frames, t0 = 0, time.perf_counter()
            for _ in range(batches):
                frames += int(next(it)["frame_mask"].sum())
            seconds = time.perf_counter() - t0
            del it, loader
            out[name] = {"frames_per_s_per_worker": round(frames / seconds, 1),
                         "clips_per_s_per_worker": round(8 * batches / seconds, 2), "frames": frames,
                         "batches": batches, "max_frames": max_frames, "image_size": size}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wide-tolerance", type=float, default=4.0,
                    help="a second keyframe-mode tolerance in seconds (about half the default GOP)")
    ap.add_argument("--loader-batches", type=int, default=6)
    ap.add_argument("--no-loader", action="store_true", help="skip the training-loader throughput")
    ap.add_argument("--quick", action="store_true", help="one small short clip, two repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.fps, args.width, args.height, args.clips, args.repeats = 8.0, 25.0, 160, 128, 1, 2
        args.loader_batches = 2
    n_frames = int(round(args.seconds * args.fps))

    clips, gop1, reencode_s = [], [], []
    for c in range(args.clips):
        t0 = time.perf_counter()
        clips.append(encode_video(clip_frames(n_frames, args.height, args.width, seed=c), fps=args.fps))
        t1 = time.perf_counter()
        gop1.append(reencode(clips[-1], gop_seconds=1.0))
        reencode_s.append(time.perf_counter() - t1)
        print(f"clip {c}: {n_frames} frames {args.width}x{args.height} @ {args.fps:g} fps, libx264 default GOP, "
              f"{len(clips[-1]) / 1e6:.2f} MB, encoded in {t1 - t0:.1f} s; re-encoded with a keyframe every "
              f"second in {reencode_s[-1]:.1f} s, {len(gop1[-1]) / 1e6:.2f} MB", file=sys.stderr)

    methods = {"decode_all": lambda d, m: decode_all(d, m, False),
               "decode_all_rgb": lambda d, m: decode_all(d, m, True)}
    for name in available_backends():
        methods[name] = reader(name)
    if "decord" in methods:
        methods["decord_plain"] = decord_plain
    methods["pyav_frame_threads_2"] = reader("pyav", threads=2)
    methods["pyav_keyframe"] = reader("pyav", seek="keyframe")
    methods[f"pyav_keyframe_tol{args.wide_tolerance:g}"] = reader("pyav", seek="keyframe",
                                                                  keyframe_tolerance=args.wide_tolerance)
    sets = {"default_gop": bench_clips(clips, args, methods), "gop_1s": bench_clips(gop1, args, methods)}
    for name, table in sets.items():
        print_table(name, table)

    exact_exact = all(r["exact_frames"] for s in sets.values() for res in s.values()
                      for n, r in res.items() if "keyframe" not in n)
    targets = {  # exact mode against decord used directly (decord_plain)
        "exact_mode_vs_decord": {f"{s}/{b}": round(t[b]["decord_plain"]["seconds"] / t[b][DEFAULT_BACKEND]["seconds"],
                                                   2)
                                 for s, t in sets.items() for b in t if "decord_plain" in t[b]},
        "keyframe_mode_vs_decode_all_default_gop": {
            f"tolerance_{tol}": sets["default_gop"]["all"][name]["speedup_vs_decode_all"]
            for tol, name in ((DEFAULT_KEYFRAME_TOLERANCE, "pyav_keyframe"),
                              (args.wide_tolerance, f"pyav_keyframe_tol{args.wide_tolerance:g}"))},
        "keyframe_mode_vs_decode_all_gop_1s": sets["gop_1s"]["all"]["pyav_keyframe"]["speedup_vs_decode_all"],
    }
    targets["exact_mode_at_least_decord"] = all(v >= 1.0 for v in targets["exact_mode_vs_decord"].values())
    targets["keyframe_mode_5x_default_gop"] = {
        k: v >= 5.0 for k, v in targets["keyframe_mode_vs_decode_all_default_gop"].items()}
    out = {
        "default_backend": DEFAULT_BACKEND,
        "backends_exact": exact_exact,
        "clip_sets": sets,
        "targets": targets,
        "reencode_gop_1s": {"seconds_per_clip": round(statistics.median(reencode_s), 2),
                            "size_ratio": round(sum(map(len, gop1)) / sum(map(len, clips)), 2)},
        "keyframe_tolerance_s": {"default": DEFAULT_KEYFRAME_TOLERANCE, "wide": args.wide_tolerance},
        "clips": {"count": args.clips, "seconds": args.seconds, "fps": args.fps, "size": [args.width, args.height],
                  "codec": "libx264", "gop": "default and 1 s"},
        "repeats": args.repeats,
    }
    if not args.no_loader:
        try:
            long = f"clips_{args.seconds:g}s"
            out["loader"] = loader_throughput({f"{long}_default_gop": clips, f"{long}_gop_1s": gop1},
                                              args.loader_batches, 16 if args.quick else 64)
        except ImportError as e:  # the loader lives in x2vlm; video/ alone cannot run it
            out["loader"] = {"skipped": f"x2vlm not importable: {e}"}
        for name, r in out["loader"].items():
            if isinstance(r, dict):
                print(f"loader {name}: {r['frames_per_s_per_worker']} frames/s per worker "
                      f"({r['clips_per_s_per_worker']} clips/s)", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
