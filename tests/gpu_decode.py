"""JPEG decoding on the CPU against nvJPEG (`decode.device = "cuda:N"`), through the decoder's
own chunk function, as the daemon calls it: frames per second of 1920x1080 JPEGs (quality 90),
the CPU with one thread per core, nvJPEG with the chunks of the same threads.

    python -m tests.gpu_decode [--device cuda:0] [--frames 512] [--json FILE]

Without a GPU (or torchvision) it prints the CPU figure alone.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sightstream.bench import make_frames
from sightstream.metrics import Metrics
from sightstream.stages.decoder import chunks, decode_chunk


def frames_per_s(jpegs: list[bytes], threads: int, batch_decoder: Any = None, rounds: int = 3) -> float:
    timer = Metrics().decode_seconds.labels("bench")
    fields = [{b"image": j} for j in jpegs]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda c: decode_chunk(c, 10**9, None, timer, batch_decoder), chunks(fields, threads)))
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            list(pool.map(lambda c: decode_chunk(c, 10**9, None, timer, batch_decoder), chunks(fields, threads)))
            best = max(best, len(fields) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    base = make_frames((1920, 1080), n=16)
    jpegs = [base[i % len(base)] for i in range(args.frames)]
    figures: dict[str, Any] = {"frames": args.frames, "size": "1920x1080", "threads": threads,
                               "cpu_fps": frames_per_s(jpegs, threads)}
    try:
        from sightstream.stages.gpu_jpeg import nvjpeg_decoder

        figures["nvjpeg_fps"] = frames_per_s(jpegs, threads, nvjpeg_decoder(args.device))
        figures["device"] = args.device
    except Exception as e:  # noqa: BLE001 - no GPU or no torchvision: the CPU figure alone
        figures["nvjpeg"] = f"not measured: {e}"
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
