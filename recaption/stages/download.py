"""Download stage: pre-filter LAION-style metadata, then let img2dataset fetch the images.

1. Read the metadata parquet files (``download.metadata``; the demo generates its own).
2. Pre-filter with pyarrow (the ``download.blocklist`` of URLs and hashes, aesthetic score,
   size, punsafe, pwatermark, URL scheme, private hosts) and record how many rows each rule
   removed.
3. Call img2dataset's Python API to write webdataset shards, per-shard parquet and
   ``_stats.json`` into ``run_dir/images/``. img2dataset's incremental mode is the resume
   mechanism: a shard without its ``_stats.json`` is downloaded again from scratch.
4. Report the success rate and the most common failure reasons; warn below a bound.

Download is not split by ``--rank``: img2dataset's own distributors scale it out, so under a
job array only rank 0 downloads. ``multiprocessing`` uses this node. ``pyspark`` uses the active
Spark session; img2dataset creates a local one (``local[download.processes]``, this node only)
when there is none, so for several nodes ``download.spark_master`` names a running Spark
cluster and this stage connects to it first. ``ray`` uses the Ray cluster this process is
connected to (``RAY_ADDRESS``), else a local one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaption.config import RunConfig
from recaption.driver import ShardedStage
from recaption.ledger import (
    LEDGER_DIR,
    STATS_SUFFIX,
    StageSummary,
    atomic_path,
    list_shards,
    write_json_atomic,
)
from recaption.metadata import (
    Blocklist,
    MetadataError,
    expand_metadata_paths,
    load_blocklist,
    prefilter,
    read_metadata,
    required_columns,
)

logger = logging.getLogger(__name__)

INPUT_FILE = "urls.parquet"
REPORT_FILE = "download_report.json"
# img2dataset names its shards with this many digits.
SHARD_DIGITS = 5


def stage_config(config: RunConfig, blocklist: Blocklist | None = None) -> dict[str, Any]:
    """What decides the download's outputs: the section, the blocklist's entries (not only
    its file names) and the demo world when it is used."""
    data: dict[str, Any] = {"download": config.download.fingerprint_dict()}
    if blocklist:
        data["blocklist"] = {
            "digest": blocklist.digest(),
            "urls": len(blocklist.urls),
            "hashes": len(blocklist.hashes),
        }
    if config.demo.enabled:
        data["demo"] = {"n_images": config.demo.n_images, "seed": config.demo.seed}
    return data


def connect_spark(master: str) -> None:
    """Create the Spark session img2dataset's pyspark distributor will find (``spark_master``).

    img2dataset uses the active session when there is one; without it, it starts a local
    session on this node. Raises ``RuntimeError`` naming the config keys when pyspark is
    missing.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise RuntimeError(
            f"download.spark_master is {master!r} but pyspark is not installed: pip install "
            "pyspark (the version of the cluster's Spark) or use download.distributor: "
            "multiprocessing"
        ) from None
    logger.info("download: connecting to the Spark cluster at %s", master)
    SparkSession.builder.master(master).appName("recaption-download").getOrCreate()


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
    """Call img2dataset's Python API with the config's options, behind the network guard.

    Every connection img2dataset's workers make, redirects included, is checked on its
    resolved address (``download.allow_loopback``, ``download.allow_private_networks``); a
    refused URL is a failed sample whose ``error_message`` says why. See
    :mod:`recaption.netguard` for how the guard reaches the worker processes.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    from recaption.netguard import NetPolicy, guard_img2dataset

    cfg = config.download
    columns = pq.read_schema(input_path).names
    extra = [c for c in cfg.save_additional_columns if c in columns]
    policy = NetPolicy(
        allow_loopback=cfg.allow_loopback, allow_private_networks=cfg.allow_private_networks
    )
    with guard_img2dataset(policy) as guarded:
        download(
            url_list=str(input_path),
            input_format="parquet",
            url_col=cfg.url_col,
            caption_col=cfg.caption_col,
            save_additional_columns=extra or None,
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
    if not guarded:
        raise RuntimeError(
            "img2dataset ran without recaption's network guard (its download() did not build "
            "its Downloader through img2dataset.main.Downloader); use img2dataset 1.47"
        )


def summarise(images_dir: Path) -> dict[str, Any]:
    """Totals over every shard's img2dataset ``_stats.json``: counts and the error histogram."""
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for shard in list_shards(images_dir, STATS_SUFFIX):
        path = images_dir / f"{shard}{STATS_SUFFIX}"
        try:
            stats = json.loads(path.read_text())
            counts = {
                key: int(stats.get(key, 0))
                for key in ("count", "successes", "failed_to_download", "failed_to_resize")
            }
            shard_errors = {
                k: int(v) for k, v in stats.get("status_dict", {}).items() if k != "success"
            }
        except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError, bad values
            raise ValueError(
                f"{path}: img2dataset's stats for shard {shard} are unreadable ({exc}); delete "
                f"this file so img2dataset downloads shard {shard} again, then rerun the "
                "download stage"
            ) from None
        totals.update(counts)
        errors.update(shard_errors)
    count = totals["count"]
    return {
        **totals,
        "success_rate": totals["successes"] / count if count else 0.0,
        "errors": dict(errors.most_common()),
    }


class DownloadStage(ShardedStage):
    """Pre-filter the metadata, then download every missing shard with img2dataset."""

    name = "download"
    output_suffixes = (".tar",)
    batch_engine = True  # img2dataset downloads every pending shard in one call
    main_rank_only = True  # img2dataset's distributors scale it, not ranks
    blocklist: Blocklist | None = None  # read by check()

    def stage_config(self) -> dict[str, Any]:
        return stage_config(self.config, self.blocklist)

    def check(self) -> None:
        cfg = self.config.download
        self.blocklist = load_blocklist(cfg.blocklist)
        paths = metadata_paths(self.config)
        required = required_columns(cfg, self.blocklist)
        wanted = list(dict.fromkeys([*required, *cfg.save_additional_columns]))
        table = read_metadata(paths, wanted, required)
        self.table, self.report = prefilter(table, cfg, self.blocklist)
        if self.blocklist:
            logger.info(
                "download: blocklist (%d URL(s), %d hash(es) from %s) removed %d row(s)",
                len(self.blocklist.urls),
                len(self.blocklist.hashes),
                ", ".join(self.blocklist.files),
                self.report.removed.get("blocklist", 0),
            )
        logger.info(
            "download: pre-filter kept %d of %d rows; removed by rule: %s",
            self.report.kept,
            self.report.input_rows,
            self.report.removed,
        )

    def input_shards(self) -> list[str]:
        """The shards img2dataset will write for the pre-filtered rows."""
        n_shards = math.ceil(self.report.kept / self.config.download.samples_per_shard)
        return [f"{i:0{SHARD_DIGITS}d}" for i in range(n_shards)]

    def my_shards(self) -> list[str]:
        return list(self.shards)

    def input_stamp(self, shard: str) -> Any:
        return None  # img2dataset's markers carry no stamp: the config fingerprint decides

    def reset(self) -> None:
        # img2dataset resumes by shard id only, so shards of the old config must go.
        logger.warning("download: --overwrite with a changed config: removing %s", self.output_dir)
        shutil.rmtree(self.output_dir)

    def process_all(self, shards: list[str]) -> None:
        input_path = self.output_dir / LEDGER_DIR / INPUT_FILE
        with url_base(self.config) as base:
            write_input(self.table, input_path, self.config.download.url_col, base)
            if self.config.download.spark_master is not None:
                connect_spark(self.config.download.spark_master)
            run_img2dataset(self.config, input_path)

    def close(self, summary: StageSummary) -> None:
        cfg = self.config.download
        totals = summarise(self.output_dir)
        summary.samples_ok = totals["successes"]
        summary.samples_failed = totals["count"] - totals["successes"]
        write_json_atomic(
            self.output_dir / LEDGER_DIR / REPORT_FILE,
            {"prefilter": self.report.__dict__, "download": totals},
        )
        top = ", ".join(f"{k} ({v})" for k, v in list(totals["errors"].items())[:5]) or "none"
        summary.messages.append(
            f"download: {totals['successes']} of {totals['count']} images downloaded "
            f"({totals['success_rate']:.1%}); top failure reasons: {top}"
        )
        if totals["count"] and totals["success_rate"] < cfg.min_success_rate:
            logger.warning(
                "download: LOW SUCCESS RATE %.1f%% (below download.min_success_rate %.0f%%): "
                "check DNS and network, raise download.timeout / download.retries, or lower "
                "download.threads; failure reasons: %s",
                100 * totals["success_rate"],
                100 * cfg.min_success_rate,
                top,
            )
