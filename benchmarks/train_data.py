"""Bytes each training process reads per epoch, for 1, 2 and 4 processes.

Each process (a separate OS process, as under torchrun) streams one epoch of its share of the
training stream (`recaption.training.data.TrainingSamples`) and reports the bytes it read
(`rchar` of /proc/self/io, so tar headers, seeks and every copy count). The goal is at most
1/N of the dataset plus one shard per process; before per-reader shards, every process read
the whole dataset (ratio 1.0 at any N).

    python benchmarks/train_data.py [--shards 16] [--per-shard 64] [--image-side 256]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger("benchmarks.train_data")


def write_shards(folder: Path, n_shards: int, per_shard: int, side: int) -> list[Path]:
    """Merged-style shards of noisy JPEGs (about the size of real ones), captions and json."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        n = per_shard + random.Random(s).randint(-per_shard // 4, per_shard // 4)
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                key = f"{s:03d}{i:05d}"
                pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("txt", f"a noisy square number {i}".encode()),
                    ("json", json.dumps({"original_text": "noise"}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def read_one_epoch(folder: str, rank: int, world_size: int) -> None:
    """Child process: stream this rank's epoch 0, print the bytes read as JSON."""
    from recaption.config import TrainConfig
    from recaption.training.data import TrainingSamples

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    shards = sorted(Path(folder).glob("*.tar"))
    samples = TrainingSamples(
        shards, TrainConfig(resolution=64, num_workers=0), rank=rank, world_size=world_size
    )
    warm = TrainingSamples(shards[:1], TrainConfig(resolution=64), rank=0, world_size=1)
    next(iter(warm.reader_stream(0)))  # imports and PIL plugins before measuring
    before, n = rchar(), 0
    for item in samples.reader_stream(rank):
        if item["position"][1] != 0:
            break
        n += 1
    print(json.dumps({"rank": rank, "bytes": rchar() - before, "samples": n}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=256)
    parser.add_argument(
        "--child", nargs=3, metavar=("FOLDER", "RANK", "WORLD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        read_one_epoch(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), args.shards, args.per_shard, args.image_side)
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        logger.info(
            "%d shards, %.1f MB in all, largest %.2f MB", len(shards), total / 1e6, largest / 1e6
        )
        logger.info(
            "%-6s %-14s %-14s %-12s %s",
            "procs",
            "max MB/proc",
            "goal MB/proc",
            "share read",
            "samples/epoch",
        )
        for world in (1, 2, 4):
            runs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--child", tmp, str(rank), str(world)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for rank in range(world)
            ]
            results = [json.loads(r.communicate()[0].strip().splitlines()[-1]) for r in runs]
            worst = max(r["bytes"] for r in results)
            goal = total / world + largest
            logger.info(
                "%-6d %-14.2f %-14.2f %-12.3f %d  %s",
                world,
                worst / 1e6,
                goal / 1e6,
                worst / total,
                sum(r["samples"] for r in results),
                "ok" if worst <= goal else "OVER GOAL",
            )


if __name__ == "__main__":
    main()
