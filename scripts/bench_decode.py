"""Benchmark: sparse 1-fps decoding per backend against decoding every frame with PyAV, in the same run.

    python scripts/bench_decode.py            # 2 clips of 60 s, 30 fps, 320x240, H.264 (libx264 default GOP)
    python scripts/bench_decode.py --quick    # 1 clip of 8 s, 25 fps, 160x128

Each frame shows its own index (video.indexcode) in its top half, above a textured band that scrolls 2 px per
frame (real motion for the encoder). Every method reads each clip at 1 fps with max_frames=None, and again with
max_frames=8; a method is exact when every frame it returns shows the index of the frame on screen at its sample
time. Baselines, both PyAV decoding every frame in order and then picking frames by timestamp:
- decode_all: converts only the picked frames to RGB (the cheapest way to decode everything);
- decode_all_rgb: converts every decoded frame to RGB first (a plain "decode the clip to an array" reader).
Times are medians over --repeats runs per clip, summed over clips. fps_decoded is returned frames per second of
wall time. The last line printed is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from video.decode import DEFAULT_BACKEND, available_backends, read_video  # noqa: E402
from video.encode import encode_video  # noqa: E402
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
    """Baseline: PyAV decodes every frame in order, then frames are picked by the same timestamp rule."""
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = [(frame.pts, frame.to_ndarray(format="rgb24") if convert_all else frame)
                   for frame in container.decode(stream)]
        tb = float(stream.time_base)
    decoded.sort(key=lambda item: item[0])
    starts = np.array([pts for pts, _ in decoded], dtype=np.float64) * tb
    times = sample_timestamps(timeline_duration(starts), 1.0, max_frames)
    picked = [decoded[i][1] for i in frame_index_at(starts - starts[0], times)]
    if not convert_all:
        picked = [frame.to_ndarray(format="rgb24") for frame in picked]
    return np.stack(picked), times


def check(frames, times, fps: float, height: int) -> bool:
    expected = [int(np.floor(t * fps + 1e-9)) for t in times]
    return [read_index(f[:height // 2]) for f in frames] == expected


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one small short clip, two repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.fps, args.width, args.height, args.clips, args.repeats = 8.0, 25.0, 160, 128, 1, 2
    n_frames = int(round(args.seconds * args.fps))

    clips = []
    for c in range(args.clips):
        t0 = time.perf_counter()
        clips.append(encode_video(clip_frames(n_frames, args.height, args.width, seed=c), fps=args.fps))
        print(f"clip {c}: {n_frames} frames {args.width}x{args.height} @ {args.fps:g} fps, libx264 default GOP, "
              f"{len(clips[-1]) / 1e6:.2f} MB, encoded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    methods = {"decode_all": lambda d, m: decode_all(d, m, False),
               "decode_all_rgb": lambda d, m: decode_all(d, m, True)}
    for name in available_backends():
        methods[name] = lambda d, m, name=name: read_video(d, fps=1.0, max_frames=m, backend=name)

    results = {}
    for max_frames in (None, 8):
        for name, fn in methods.items():
            total, n_out, exact = 0.0, 0, True
            for data in clips:
                fn(data, max_frames)  # warm-up: first-call costs (imports, codec set-up) are not measured
                runs = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    frames, times = fn(data, max_frames)
                    runs.append(time.perf_counter() - t0)
                total += statistics.median(runs)
                n_out += len(frames)
                exact = exact and check(frames, times, args.fps, args.height)
            results[(name, max_frames)] = {"seconds": total, "frames": n_out, "exact_frames": exact}

    base = {m: results[("decode_all", m)]["seconds"] for m in (None, 8)}
    base_rgb = {m: results[("decode_all_rgb", m)]["seconds"] for m in (None, 8)}
    print(f"{'method':<16}{'max_frames':>11}{'frames':>8}{'seconds':>9}{'fps_decoded':>13}"
          f"{'vs decode_all':>15}{'vs decode_all_rgb':>19}{'exact':>7}")
    for (name, m), r in results.items():
        print(f"{name:<16}{str(m):>11}{r['frames']:>8}{r['seconds']:>9.3f}{r['frames'] / r['seconds']:>13.1f}"
              f"{base[m] / r['seconds']:>14.2f}x{base_rgb[m] / r['seconds']:>18.2f}x{str(r['exact_frames']):>7}")

    def summary(name, m):
        r = results[(name, m)]
        return {"fps_decoded": round(r["frames"] / r["seconds"], 1),
                "speedup_vs_decode_all": round(base[m] / r["seconds"], 2),
                "speedup_vs_decode_all_rgb": round(base_rgb[m] / r["seconds"], 2),
                "exact_frames": r["exact_frames"], "seconds": round(r["seconds"], 4)}

    backends = {name: {**summary(name, None), "max_frames_8": summary(name, 8)} for name in available_backends()}
    exact = [n for n in backends if backends[n]["exact_frames"]]
    out = {
        "default_backend": DEFAULT_BACKEND,
        "fastest_exact_backend": max(exact, key=lambda n: backends[n]["speedup_vs_decode_all"]) if exact else None,
        "backends": backends,
        "baselines": {name: {**summary(name, None), "max_frames_8": summary(name, 8)}
                      for name in ("decode_all", "decode_all_rgb")},
        "clips": {"count": args.clips, "seconds": args.seconds, "fps": args.fps, "size": [args.width, args.height],
                  "codec": "libx264", "gop": "default"},
        "repeats": args.repeats,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
