"""Decoding cost of the data stage at Cholec80's frame size (854 x 480, 25 fps, H.264).

A synthetic video in the Cholec80 layout is generated (or ``--video`` names one), then decoded
in this one process in each way below, timed with the process's CPU time and wall time:

- ``decode``: every frame decoded, nothing converted (PyAV, FFmpeg's default threading);
- ``decode, threads=1``: the same with FFmpeg held to one thread (a process's own share of a
  machine running one decoding process per core);
- ``decode, thread_type=AUTO``: frame and slice threading (frames come out in the same order,
  all of them, so the pairing by decoded index is unchanged);
- ``data stage``: :func:`lib.data.cholec80.decode_frames` as the data stage calls it: every frame
  decoded, one in 25 converted to RGB and resized to 224 x 224.

Printed: frames per second (wall) and per CPU-second, and from the data stage's rate the time
to decode Cholec80's 80 videos (4.6 million frames) on 1, 4 and 16 processes, and
the frame cache's size at 224 px.

    python benchmarks/bench_decode.py [--seconds 20] [--video path.mp4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.data import cholec80, synthetic  # noqa: E402

CHOLEC80_FRAMES = 4_600_000  # all frames of the 80 videos at 25 fps (about 51 hours)
CACHED_FRAMES = 48_713 + 31_477  # single-tool frames of both splits (the paper's counts)
BYTES_PER_FRAME = 3 * 224 * 224


def decode_only(path: Path, *, thread_type: str | None = None, threads: int | None = None) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if thread_type:
            stream.thread_type = thread_type
        if threads:
            stream.codec_context.thread_count = threads
        return sum(1 for _ in container.decode(stream))


def data_stage(path: Path, keep: range, total: int) -> int:
    """Frames decoded by the data stage's reader for ``keep`` (it decodes them all)."""
    cholec80.decode_frames(path, keep, image_size=224, min_frames=total)
    return total


def timed(run) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    frames = run()
    return frames, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="length of the generated video")
    parser.add_argument("--video", type=Path, default=None, help="an 854 x 480 mp4 to decode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = args.video
        if path is None:
            root = synthetic.generate(Path(folder) / "c80", n_videos=2, width=854, height=480,
                                      seconds_per_video=args.seconds, seed=0, workers=1,
                                      progress=False)
            path = root / "videos" / cholec80.video_file_name(1)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = stream.frames
            print(f"{path.name}: {stream.codec_context.width} x {stream.codec_context.height}, "
                  f"{float(stream.average_rate):.0f} fps, {total} frames")
        keep = range(0, total, cholec80.ANNOTATION_INTERVAL)
        ways = {
            "decode": lambda: decode_only(path),
            "decode, threads=1": lambda: decode_only(path, threads=1),
            "decode, thread_type=AUTO": lambda: decode_only(path, thread_type="AUTO"),
            "data stage (1 in 25 kept, 224 px)": lambda: data_stage(path, keep, total),
        }
        decode_only(path)  # warm the file cache
        print(f"{'way':<36}{'frames':>8}{'wall s':>8}{'cpu s':>8}{'frames/s':>10}"
              f"{'frames/cpu-s':>14}")
        rates = {}
        for name, run in ways.items():
            frames, wall, cpu = timed(run)
            rates[name] = (frames / wall, frames / cpu)
            print(f"{name:<36}{frames:>8}{wall:>8.2f}{cpu:>8.2f}{frames / wall:>10.0f}"
                  f"{frames / cpu:>14.0f}")
    per_process = rates["data stage (1 in 25 kept, 224 px)"][1]
    print(f"\ndata stage: {per_process:.0f} frames per CPU-second; Cholec80's "
          f"{CHOLEC80_FRAMES / 1e6:.1f} million frames:")
    for processes in (1, 4, 16):
        hours = CHOLEC80_FRAMES / (per_process * processes) / 3600
        print(f"  {processes:>2} processes (one core each): {hours:.2f} h")
    size = CACHED_FRAMES * BYTES_PER_FRAME
    print(f"frame cache at 224 px: {CACHED_FRAMES} frames x {BYTES_PER_FRAME} bytes = "
          f"{size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
