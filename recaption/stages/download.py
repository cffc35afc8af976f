"""Download stage: pre-filter LAION-style metadata, then let img2dataset fetch the images.

1. Read the metadata parquet files (``download.metadata``; the demo generates its own).
2. Pre-filter with pyarrow (aesthetic score, size, punsafe, pwatermark, URL scheme, private
   hosts) and record how many rows each rule removed.
3. Call img2dataset's Python API to write webdataset shards, per-shard parquet and
   ``_stats.json`` into ``run_dir/images/``. img2dataset's incremental mode is the resume
   mechanism: a shard without its ``_stats.json`` is downloaded again from scratch.
4. Report the success rate and the most common failure reasons; warn below a bound.

Download is not split by ``--rank``: img2dataset's own distributors scale it out
(``multiprocessing`` on one node, ``pyspark`` or ``ray`` across nodes), so under a job array
only rank 0 downloads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaption.config import RunConfig
from recaption.ledger import (
    STATS_SUFFIX,
    ShardLedger,
    StageSummary,
    atomic_path,
    list_shards,
    write_json_atomic,
)
from recaption.metadata import (
    MetadataError,
    expand_metadata_paths,
    prefilter,
    read_metadata,
    required_columns,
)
from recaption.stages import StageContext

logger = logging.getLogger(__name__)

STAGE = "download"
INPUT_FILE = "urls.parquet"
REPORT_FILE = "download_report.json"
# img2dataset names its shards with this many digits.
SHARD_DIGITS = 5


def stage_config(config: RunConfig) -> dict[str, Any]:
    """What decides the download's outputs: the section, and the demo world when it is used."""
    data: dict[str, Any] = {"download": config.download.fingerprint_dict()}
    if config.demo.enabled:
        data["demo"] = {"n_images": config.demo.n_images, "seed": config.demo.seed}
    return data


def metadata_paths(config: RunConfig) -> list[Path]:
    """The metadata files to read: the configured ones, or the demo world's."""
    if config.download.metadata:
        return expand_metadata_paths(config.download.metadata)
    if config.demo.enabled:
        from recaption.demo.world import generate_world

        world = generate_world(config.demo_world_dir, config.demo.n_images, config.demo.seed)
        return [world.metadata]
    raise MetadataError(
        f"{config.source}: download.metadata is empty; list the LAION-aesthetics metadata "
        "parquet files (or a folder of them)"
    )


@contextlib.contextmanager
def url_base(config: RunConfig) -> Iterator[str | None]:
    """While the demo is on, serve its world on loopback and yield the server's base URL."""
    if not config.demo.enabled or config.download.metadata:
        yield None
        return
    from recaption.demo.server import serve_world

    with serve_world(
        config.demo_world_dir / "files", hang_seconds=config.download.timeout * 4 + 5
    ) as base:
        yield base


def write_input(table: pa.Table, path: Path, url_col: str, base: str | None) -> None:
    """Write the pre-filtered rows img2dataset reads, pointing demo URLs at the live server."""
    if base is not None:
        from recaption.demo.world import DEMO_HOST

        urls = pc.replace_substring(table[url_col], DEMO_HOST, base)
        table = table.set_column(table.schema.get_field_index(url_col), url_col, urls)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def run_img2dataset(config: RunConfig, input_path: Path) -> None:
    """Call img2dataset's Python API with the config's options."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    cfg = config.download
    columns = pq.read_schema(input_path).names
    download(
        url_list=str(input_path),
        input_format="parquet",
        url_col=cfg.url_col,
        caption_col=cfg.caption_col,
        save_additional_columns=[c for c in cfg.save_additional_columns if c in columns] or None,
        output_format="webdataset",
        output_folder=str(config.images_dir),
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        number_sample_per_shard=cfg.samples_per_shard,
        oom_shard_count=SHARD_DIGITS,
        processes_count=cfg.processes,
        thread_count=cfg.threads,
        timeout=cfg.timeout,
        retries=cfg.retries,
        distributor=cfg.distributor,
        incremental_mode="incremental",
        disallowed_header_directives=cfg.disallowed_header_directives,
        user_agent_token=cfg.user_agent_token,
        enable_wandb=False,
    )


def summarise(images_dir: Path) -> dict[str, Any]:
    """Totals over every shard's img2dataset ``_stats.json``: counts and the error histogram."""
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for shard in list_shards(images_dir, STATS_SUFFIX):
        stats = json.loads((images_dir / f"{shard}{STATS_SUFFIX}").read_text())
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
        errors.update(
            {k: int(v) for k, v in stats.get("status_dict", {}).items() if k != "success"}
        )
    count = totals["count"]
    return {
        **totals,
        "success_rate": totals["successes"] / count if count else 0.0,
        "errors": dict(errors.most_common()),
    }


def run(ctx: StageContext) -> StageSummary:
    """Run the download stage (see the module docstring)."""
    config = ctx.config
    cfg = config.download
    start = time.perf_counter()
    summary = StageSummary(STAGE, ctx.rank, ctx.world_size)
    if ctx.rank != 0:
        summary.messages.append(
            f"download runs on rank 0 only (this is rank {ctx.rank}); scale it with "
            "download.distributor and download.processes"
        )
        return summary

    paths = metadata_paths(config)
    required = required_columns(cfg)
    wanted = list(dict.fromkeys([*required, *cfg.save_additional_columns]))
    table = read_metadata(paths, wanted, required)
    table, report = prefilter(table, cfg)
    logger.info(
        "download: pre-filter kept %d of %d rows; removed by rule: %s",
        report.kept,
        report.input_rows,
        report.removed,
    )
    if report.kept == 0:
        raise MetadataError(
            f"no rows left after the pre-filter (removed by rule: {report.removed}); relax "
            "download.min_aesthetic_score / max_punsafe / max_pwatermark or check the columns"
        )
    # The inputs are valid: only now is the output folder touched.
    ledger = ShardLedger(STAGE, config.images_dir, stage_config(config), overwrite=ctx.overwrite)
    recorded = ledger.recorded_config()
    if ctx.overwrite and recorded and recorded.get("fingerprint") != ledger.fingerprint:
        # img2dataset resumes by shard id only, so shards of the old config must go.
        logger.warning(
            "download: --overwrite with a changed config: removing %s", config.images_dir
        )
        shutil.rmtree(config.images_dir)
    ledger.prepare()
    n_shards = math.ceil(report.kept / cfg.samples_per_shard)
    expected = [f"{i:0{SHARD_DIGITS}d}" for i in range(n_shards)]
    done_before = ledger.done_shards()
    summary.shards_total = len(expected)
    summary.shards_done_before = len([s for s in expected if s in set(done_before)])

    input_path = ledger.records_dir / INPUT_FILE
    with url_base(config) as base:
        write_input(table, input_path, cfg.url_col, base)
        if summary.shards_done_before < len(expected):
            run_img2dataset(config, input_path)

    done = set(ledger.done_shards())
    for shard in expected:
        if shard in done:
            if shard not in done_before:
                summary.shards_ok.append(shard)
            with contextlib.suppress(FileNotFoundError):
                ledger.failed_path(shard).unlink()
        else:
            error = "img2dataset wrote no _stats.json for this shard (see its log above)"
            ledger.mark_failed(shard, error)
            summary.shards_failed[shard] = error
    totals = summarise(config.images_dir)
    summary.seconds = time.perf_counter() - start
    summary.samples_ok = totals["successes"]
    summary.samples_failed = totals["count"] - totals["successes"]
    write_json_atomic(
        ledger.records_dir / REPORT_FILE, {"prefilter": report.__dict__, "download": totals}
    )
    top = ", ".join(f"{k} ({v})" for k, v in list(totals["errors"].items())[:5]) or "none"
    summary.messages.append(
        f"download: {totals['successes']} of {totals['count']} images downloaded "
        f"({totals['success_rate']:.1%}); top failure reasons: {top}"
    )
    if totals["count"] and totals["success_rate"] < cfg.min_success_rate:
        logger.warning(
            "download: LOW SUCCESS RATE %.1f%% (below download.min_success_rate %.0f%%): check "
            "DNS and network, raise download.timeout / download.retries, or lower "
            "download.threads; failure reasons: %s",
            100 * totals["success_rate"],
            100 * cfg.min_success_rate,
            top,
        )
    return summary
