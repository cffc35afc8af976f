"""Download stage vs bare img2dataset, same settings, same loopback fixture, side by side.

    python benchmarks/download.py [--images 600] [--rounds 2]

Both sides download the same pre-filtered URL list from the demo world's loopback server with
the same img2dataset options; rounds alternate which side goes first. Prints images/s of
each and their ratio (ours / bare); the wrapper should cost nothing (ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from recaption.config import load_config
from recaption.demo.server import serve_world
from recaption.stages import StageContext
from recaption.stages.download import run, run_img2dataset, summarise, write_input

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the comparison and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="recaption-bench-"))
    overrides = [
        f"run_dir={work / 'ours'}",
        f"demo.n_images={args.images}",
        "download.min_aesthetic_score=null",
        "download.max_punsafe=null",
        "download.max_pwatermark=null",
        "download.samples_per_shard=100",
        f"download.processes={args.processes}",
        f"download.threads={args.threads}",
        "download.timeout=2",
    ]
    ours_rates, bare_rates = [], []
    for round_index in range(args.rounds):
        for side in ("ours", "bare") if round_index % 2 == 0 else ("bare", "ours"):
            config = load_config(REPO / "configs" / "demo.yaml", overrides)
            shutil.rmtree(config.images_dir, ignore_errors=True)
            if side == "ours":
                t0 = time.perf_counter()
                summary = run(StageContext(config))
                seconds = time.perf_counter() - t0
                ours_rates.append(summary.samples_ok / seconds)
            else:
                # Bare img2dataset on the very URL list our stage wrote (already pre-filtered).
                url_list = config.images_dir.parent / "bare_input.parquet"
                from recaption.demo.world import generate_world
                from recaption.metadata import prefilter, read_metadata, required_columns

                world = generate_world(config.demo_world_dir, args.images, config.demo.seed)
                req = required_columns(config.download)
                table, _ = prefilter(
                    read_metadata([world.metadata], list(req), req), config.download
                )
                with serve_world(world.files, hang_seconds=13) as base:
                    write_input(table, url_list, "URL", base)
                    config.images_dir.mkdir(parents=True)
                    t0 = time.perf_counter()
                    run_img2dataset(config, url_list)
                    seconds = time.perf_counter() - t0
                bare_rates.append(summarise(config.images_dir)["successes"] / seconds)
    ours, bare = statistics.median(ours_rates), statistics.median(bare_rates)
    print(
        f"images: {args.images}  processes: {args.processes}  threads: {args.threads}  "
        f"rounds: {args.rounds}"
    )
    print(
        f"recaption download : {ours:8.1f} images/s  (rounds: "
        f"{', '.join(f'{r:.1f}' for r in ours_rates)})"
    )
    print(
        f"bare img2dataset   : {bare:8.1f} images/s  (rounds: "
        f"{', '.join(f'{r:.1f}' for r in bare_rates)})"
    )
    print(f"ratio ours / bare  : {ours / bare:8.3f}  (goal >= 0.9)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
