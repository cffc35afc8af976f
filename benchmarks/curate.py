"""Speed of the filter rules and of the merge stage, printed side by side.

    python benchmarks/curate.py [--captions 50000] [--samples 400] [--image-kb 150]

1. Filter rules without CLIP, on one core: captions/s of ``filter_table`` (every rule,
   language identification included) over LLaVA-like captions (boilerplate openings, loops,
   truncations, refusals, some French), plus the run-wide duplicate hashing pass. Goal:
   >= 100k captions/s.
2. Merge: MB/s of ``merge_shard`` (stream the image tar, join captions and decisions, write the
   webdataset tar and the parquet table; both tars through the standard library's ``tarfile``)
   divided by the MB/s of a plain copy of the same tar bytes, in the same run. Goal: >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from recaption.caption_rules import RunInputs, build_rules, caption_hash
from recaption.config import FilterConfig, RunConfig
from recaption.stages.filter import filter_table
from recaption.stages.merge import merge_shard

SUBJECTS = ["a red car", "two dogs", "an old lighthouse", "a bowl of ramen", "a woman", "a city"]
PLACES = ["on a quiet street", "on a sandy beach", "in a kitchen", "under a cloudy sky"]
DETAILS = [
    "The background is blurred and the light is soft.",
    "There are trees on the left and a building on the right.",
    "The colors are warm, with orange and yellow tones.",
    "A person in a blue jacket walks past in the distance.",
]


def make_captions(n: int, seed: int = 0) -> pa.Table:
    """A caption-stage table of LLaVA-like captions with the usual failure mix."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = f"{rng.choice(SUBJECTS)} {rng.choice(PLACES)}. " + " ".join(rng.sample(DETAILS, 2))
        roll = rng.random()
        finish = "stop"
        if roll < 0.5:
            caption = "The image shows " + body + f" Frame {i}."
        elif roll < 0.6:
            caption = body + " and a tree, and a tree, and a tree, and a tree"
            finish = "length"
        elif roll < 0.7:
            caption = body + f" Frame {i}. The sky is"
            finish = "length"
        elif roll < 0.72:
            caption = "I'm sorry, I cannot see the image."
        elif roll < 0.74:
            caption = f"Une voiture rouge garée dans une rue calme, image numéro {i}."
        else:
            caption = body[0].upper() + body[1:] + f" Frame {i}."
        rows.append(
            {
                "key": f"{i:09d}",
                "caption": caption,
                "original_text": f"photo {i}",
                "finish_reason": finish,
                "status": "ok",
            }
        )
    return pa.Table.from_pylist(rows)


def text_token_counter() -> object:
    """Token counts with a fast CLIP tokenizer loaded through AutoTokenizer, as the filter
    stage loads the teacher's (the demo's tokenizer: a small vocabulary, the same code)."""
    from transformers import AutoTokenizer

    from recaption.demo.tiny_models import build_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_clip_tokenizer().save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    backend = tokenizer.backend_tokenizer  # what the filter stage calls
    backend.no_truncation()
    return lambda text: len(backend.encode(text).ids)


def bench_filter(n: int) -> None:
    table = make_captions(n)
    captions = table.column("caption").to_pylist()
    t0 = time.perf_counter()
    hashes = [caption_hash(c) for c in captions]
    hash_s = time.perf_counter() - t0
    counts = {h: 1 for h in hashes}
    results = {}
    count_tokens = text_token_counter()
    for label, section, inputs in (
        ("all rules (lingua included)", FilterConfig(), RunInputs(duplicate_counts=counts)),
        (
            "all rules, language rule off",
            FilterConfig(keep_languages=[]),
            RunInputs(duplicate_counts=counts),
        ),
        (
            "all rules + 77-token rule",
            FilterConfig(),
            RunInputs(duplicate_counts=counts, count_text_tokens=count_tokens),
        ),
    ):
        rules = build_rules(section, inputs)
        filter_table(table.slice(0, 2000), rules)  # warm up lingua's models
        t0, c0 = time.perf_counter(), time.process_time()
        _, stats = filter_table(table, rules, caption_hashes=np.array(hashes))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[label] = (n / seconds, n / cpu, stats)
    print(f"filter rules, {n} captions, one Python process (wall clock; CPU time of that core):")
    for label, (rate, cpu_rate, stats) in results.items():
        print(
            f"  {label:<32} {rate:>10,.0f} captions/s  ({cpu_rate:,.0f}/CPU-s)"
            f"   kept {stats['n_kept']}/{n}"
        )
    print(f"  {'duplicate hash pass':<32} {n / hash_s:>10,.0f} captions/s")
    both = 1 / (1 / results["all rules (lingua included)"][0] + hash_s / n)  # wall clock
    print(f"  {'stage total (hash + rules)':<32} {both:>10,.0f} captions/s   goal >= 100,000")
    print(f"  rejected: {json.dumps(results['all rules (lingua included)'][2]['rejected'])}")


def bench_merge(n: int, image_kb: int, workdir: Path) -> None:
    config = RunConfig(run_dir=workdir / "run")
    shard = "00000"
    config.images_dir.mkdir(parents=True)
    config.captions_dir.mkdir(parents=True)
    config.filtered_dir.mkdir(parents=True)
    config.stage_dir("merge").mkdir(parents=True)
    rng = random.Random(0)
    tar_path = config.images_dir / f"{shard}.tar"
    with wds.TarWriter(str(tar_path)) as sink:
        for i in range(n):
            key = f"{i:09d}"
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "width": 1024}
            meta.update({"height": 768, "AESTHETIC_SCORE": 6.3})
            sink.write(
                {
                    "__key__": key,
                    "jpg": rng.randbytes(image_kb * 1024),  # merge never decodes images
                    "txt": f"photo {i}",
                    "json": meta,
                }
            )
    captions = make_captions(n)
    pq.write_table(captions, config.captions_dir / f"{shard}.parquet")
    rules = build_rules(FilterConfig(keep_languages=[]), RunInputs(duplicate_counts={}))
    filtered, stats = filter_table(captions, rules)
    pq.write_table(filtered, config.filtered_dir / f"{shard}.parquet")
    kept_fraction = stats["n_kept"] / n
    size_mb = tar_path.stat().st_size / 1e6

    def copy() -> float:
        t0 = time.perf_counter()
        shutil.copyfile(tar_path, workdir / "copy.tar")
        os.sync()
        return time.perf_counter() - t0

    def merge() -> float:
        t0 = time.perf_counter()
        merge_shard(config, shard)
        os.sync()
        return time.perf_counter() - t0

    copy()  # warm the page cache for both
    copy_s = min(copy() for _ in range(3))
    merge_s = min(merge() for _ in range(3))
    print(
        f"merge, one shard: {n} samples, {size_mb:.0f} MB tar, {kept_fraction:.0%} of samples kept:"
    )
    print(f"  plain copy of the tar bytes {size_mb / copy_s:>10,.0f} MB/s")
    print(f"  merge_shard                 {size_mb / merge_s:>10,.0f} MB/s (input tar MB)")
    print(f"  ratio merge / copy          {copy_s / merge_s:>10.2f}   goal >= 0.5")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--image-kb", type=int, default=150)
    args = parser.parse_args(argv)
    bench_filter(args.captions)
    with tempfile.TemporaryDirectory() as tmp:
        bench_merge(args.samples, args.image_kb, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
