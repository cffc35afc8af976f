"""The real run's settings and safety nets, checked without a cluster or a GPU.

The SLURM side of the same (CPUs per task on a cluster that binds tasks, a slow checkpoint at
the time limit, a truncated tar retried and left out) runs in tests/jobs on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recaption.config import ConfigError, load_config
from recaption.ledger import ShardLedger
from recaption.metadata import (
    Blocklist,
    MetadataError,
    load_blocklist,
    prefilter,
    read_metadata,
    required_columns,
)
from recaption.status import collect_status, format_status, gate, give_up, wall_clock_eta

REPO = Path(__file__).resolve().parents[2]
LAION = REPO / "configs" / "laion_aesthetics_6plus.yaml"
SUBMIT = REPO / "jobs" / "submit.sh"
GUIDE = (REPO / "docs" / "GUIDE.md").read_text()


# -- 1. the training recipe ---------------------------------------------------------------
def test_the_laion_config_trains_with_koala_s_published_recipe() -> None:
    config = load_config(LAION)
    t = config.train
    # KOALA's model cards: 500K iterations at a batch of 128, 1024px (docs/GUIDE.md).
    assert t.max_steps == 500_000
    assert t.resolution == 1024 and config.sample.height == config.sample.width == 1024
    assert t.global_batch_size == 128
    # The documented layout, 4 nodes x 8 GPUs, gives exactly that global batch.
    assert t.batch_size * 4 * 8 * t.gradient_accumulation_steps == 128
    # BK-SDM's constant 5e-5, with a short warm-up; EMA on.
    assert (t.learning_rate, t.lr_warmup_steps, t.use_ema) == (5e-5, 500, True)
    assert t.checkpointing_steps < t.max_steps and t.checkpoints_total_limit
    assert t.synthetic_caption_ratio == 1.0
    # Filtering is on for the real run: language rule and CLIP scoring.
    assert config.filter.keep_languages == ["en"] and config.filter.clip_model
    assert 0 < config.merge.min_done_fraction < 1


def test_the_guide_states_the_checkpoint_size_of_each_preset() -> None:
    """fp32 weights (4 B) + AdamW's two moments (8 B) + the fp32 EMA copy (4 B) per parameter."""
    from recaption.models.koala import count_parameters, student_config
    from recaption.models.sdxl import SDXL_BASE_UNET_CONFIG

    for preset in ("koala-700m", "koala-1b"):
        params = count_parameters(student_config(SDXL_BASE_UNET_CONFIG, preset))
        size = f"{params * 16 / 1e9:.1f} GB"
        assert size in GUIDE, f"docs/GUIDE.md does not state {preset}'s checkpoint as {size}"
    assert "~10 GB per checkpoint" not in GUIDE


def _dry_run(run_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RECAPTION_"))}
    environ.update(RECAPTION_PYTHON=sys.executable, RECAPTION_CPU_ONLY="0", **env)
    return subprocess.run(
        ["bash", str(SUBMIT), str(LAION), f"run_dir={run_dir}", *args, "--dry-run"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_submit_refuses_a_training_job_with_another_global_batch(tmp_path: Path) -> None:
    result = _dry_run(tmp_path / "run", RECAPTION_TRAIN_NODES="2")
    assert result.returncode == 2, result.stderr
    assert "train.global_batch_size is 128" in result.stderr
    assert "64 = train.batch_size 4 x 2 node(s) (RECAPTION_TRAIN_NODES) x 8" in result.stderr
    assert "sbatch " not in result.stderr  # nothing printed as submitted
    ok = _dry_run(tmp_path / "run", RECAPTION_TRAIN_NODES="4")
    assert ok.returncode == 0, ok.stderr
    # An override that restores the product is accepted too.
    fixed = _dry_run(
        tmp_path / "run", "train.gradient_accumulation_steps=2", RECAPTION_TRAIN_NODES="2"
    )
    assert fixed.returncode == 0, fixed.stderr


def test_submit_gives_train_its_signal_lead_and_plan_no_signal(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    chain = _dry_run(run_dir, RECAPTION_TRAIN_NODES="4")
    lines = [line for line in chain.stderr.splitlines() if line.startswith("sbatch ")]
    download, plan = lines
    assert "--signal=B:USR1@120" in download and "download.sbatch" in download
    assert "--signal" not in plan and "plan.sbatch" in plan
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "images" / "00000.tar").touch()
    train = _dry_run(run_dir, "--from", "train", "--to", "train", RECAPTION_TRAIN_NODES="4")
    (line,) = [line for line in train.stderr.splitlines() if line.startswith("sbatch ")]
    assert "--signal=B:USR1@300" in line and "RECAPTION_SIGNAL_LEAD_S=300" in line
    assert "--nodes=4" in line and "--cpus-per-task=64" in line


# -- 2. CPUs of every srun ----------------------------------------------------------------
def _commands(script: Path) -> list[str]:
    """The script's command lines, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def _srun_options(line: str) -> list[str] | None:
    """The options of an ``srun`` command on ``line`` (up to its first non-option word), or
    ``None`` when ``srun`` is not run there."""
    match = re.search(r"(?:^\s*|[;&|(]\s*|\b(?:exec|recaption_run_step)\s+)srun\s+(.*)", line)
    if match is None:
        return None
    options = []
    for word in match.group(1).split():
        if not word.startswith("-"):
            break
        options.append(word)
    return options


def test_every_srun_in_the_jobs_passes_the_cpus_per_task() -> None:
    """srun does not inherit --cpus-per-task from sbatch since Slurm 22.05 (srun(1))."""
    found = []
    for script in sorted((REPO / "jobs").iterdir()):
        if not script.is_file():
            continue
        for line in _commands(script):
            options = _srun_options(line)
            if options is None:
                continue
            found.append(script.name)
            assert any(re.fullmatch(r"--cpus-per-task=\S+|-c\d*", o) for o in options), (
                f"{script.name}: srun without --cpus-per-task: {line.strip()}"
            )
    assert "train.sbatch" in found, "no srun found: the check would pass vacuously"
    assert _srun_options("srun --nodes=2 bash -c x") == ["--nodes=2"]
    assert _srun_options('[[ "$1" == srun ]] && x=1') is None


# -- 3. stopping training: the launcher's settings exist in the installed torch ----------------
def test_the_launcher_reads_the_shutdown_timeout_and_signals_jobs_train_sets(monkeypatch):
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import get_args_parser

    train = (REPO / "jobs" / "train.sbatch").read_text()
    assert 'export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${RECAPTION_TRAIN_SHUTDOWN_TIMEOUT:-$lead}"' in (
        train
    )
    assert 'export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"' in train
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    args = get_args_parser().parse_args(["--nproc-per-node", "2", "x.py"])
    assert "SIGUSR1" in args.signals_to_handle.split(",")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2)
    assert config.shutdown_timeout == 300


def _find_stage(*words: str) -> tuple[str, str]:
    script = 'source jobs/stage_step.sh; _recaption_find_stage "$@"; '
    script += 'printf "%s|%s" "$_recaption_stage" "${_recaption_stage_args[*]}"'
    out = subprocess.run(
        ["bash", "-c", script, "bash", *words],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    stage, _, args = out.partition("|")
    return stage, args


def test_the_job_step_finds_its_stage_in_every_launcher_form() -> None:
    py = sys.executable
    assert _find_stage(py, "-m", "recaption", "filter", "c.yaml", "a=1") == ("filter", "c.yaml a=1")
    assert _find_stage(
        py, "-m", "torch.distributed.run", "--standalone", "-m", "recaption", "caption", "c.yaml"
    ) == ("caption", "c.yaml")
    assert _find_stage(
        "srun", "--cpus-per-task=8", "bash", "-c", "exec x", py, "--num_machines", "4",
        "-m", "recaption", "train", "c.yaml", "train.max_steps=9", "--overwrite",
    ) == ("train", "c.yaml train.max_steps=9")  # fmt: skip
    assert _find_stage(py, "-m", "recaption.status", "gate") == ("", "")


# -- 5. the failure policy -----------------------------------------------------------------
def _policy_run(tmp_path: Path, make_config, fraction: float) -> Path:
    """Four downloaded shards; caption did 00000-00002 and failed 00003 for good."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    path = make_config(tmp_path / "run.yaml", run_dir, merge={"min_done_fraction": fraction})
    config = load_config(path)
    config.images_dir.mkdir(parents=True)
    for i in range(4):
        shard = f"{i:05d}"
        (config.images_dir / f"{shard}.tar").write_bytes(b"\0" * 1024)
        (config.images_dir / f"{shard}_stats.json").write_text(
            json.dumps({"count": 10, "successes": 9, "duration": 5.0})
        )
    ledger = ShardLedger("caption", config.captions_dir, {"model": "m"})
    ledger.prepare()
    for i in range(3):
        pq.write_table(pa.table({"key": ["a"]}), config.captions_dir / f"{i:05d}.parquet")
        ledger.mark_done(f"{i:05d}", {"n_ok": 9, "n_failed": 0, "seconds": 2.0})
    ledger.mark_failed("00003", "ShardError: images/00003.tar is truncated or corrupt")
    return path


def test_the_chain_goes_on_without_a_failed_shard_when_enough_came_through(tmp_path, make_config):
    config = load_config(_policy_run(tmp_path, make_config, 0.7))
    ok, messages = gate(config, "filter")
    assert ok
    assert messages == [
        "filter: going on without 1 caption shard(s) that failed (00003): 3 of 4 (75.0%) came "
        "through, merge.min_done_fraction = 0.7; they are listed by `recaption status` and in "
        "the dataset card"
    ]
    assert gate(config, "caption") == (True, [])  # the download lost nothing
    ok, messages = give_up(config, "caption")
    assert ok and "giving up on caption shard(s) 00003" in messages[0]
    # Training has no shards to leave out: a training job that keeps failing stops the chain.
    assert not give_up(config, "train")[0]


def test_the_chain_stops_with_the_shards_named_when_too_few_came_through(
    tmp_path, make_config, capsys
):
    from recaption.status import main

    path = _policy_run(tmp_path, make_config, 0.9)
    config = load_config(path)
    ok, (message,) = gate(config, "filter")
    assert not ok
    assert message.startswith(
        "filter: refusing to start: caption brought 3 of the run's 4 shard(s) through (75.0%), "
        "below merge.min_done_fraction = 0.9"
    )
    assert "Shards left out by caption: 00003" in message
    assert f"jobs/submit.sh {path} --from caption" in message
    assert main(["gate", "filter", str(path)]) == 2
    # merge also finds that filter brought none through.
    assert len(gate(config, "merge")[1]) == 2
    assert "refusing to start" in capsys.readouterr().err
    # With every shard required, a task that keeps failing stops the chain where it is.
    strict = load_config(_policy_run(tmp_path / "strict", make_config, 1.0))
    ok, (message,) = give_up(strict, "caption")
    assert not ok and "the chain stops here" in message and "00003" in message
    assert main(["give-up", "caption", str(strict.source)]) == 1
    assert main(["gate", "caption", str(path)]) == 0


# -- 6. status: a wall-clock ETA over all workers --------------------------------------------
def test_eta_is_wall_clock_time_over_every_worker() -> None:
    now = 1_000_000.0
    # Four workers, 100 s a shard, for the last 1000 s: 40 shards done.
    finished = [(now - 1000 + 100 * (k + 1), 100.0) for k in range(10) for _ in range(4)]
    eta = wall_clock_eta(finished, pending=40, now=now)
    assert eta["workers_recent"] == 4
    assert eta["eta_seconds"] == pytest.approx(1000, rel=0.01)  # not 4000 (one worker's)
    assert eta["worker_seconds_left"] == 4000
    assert eta["shards_per_hour"] == pytest.approx(144, rel=0.01)
    # Nothing finished in the last hour: no ETA (no worker seems to run), only the work left.
    idle = wall_clock_eta([(now - 7200, 100.0)] * 5, pending=5, now=now)
    assert idle["eta_seconds"] is None and idle["workers_recent"] == 0
    assert idle["worker_seconds_left"] == 500
    assert wall_clock_eta(finished, pending=0, now=now)["eta_seconds"] is None


def test_status_shows_the_wall_clock_eta_of_a_running_stage(tmp_path, make_config) -> None:
    config = load_config(_policy_run(tmp_path, make_config, 1.0))
    # Two more image shards pending for caption; the three done ones just finished, 2 s each,
    # done by three workers at once.
    for i in (4, 5):
        (config.images_dir / f"{i:05d}.tar").write_bytes(b"\0" * 1024)
        (config.images_dir / f"{i:05d}_stats.json").write_text(
            json.dumps({"count": 10, "successes": 9, "duration": 5.0})
        )
    now = time.time()
    for i in range(3):
        os.utime(config.captions_dir / f"{i:05d}_stats.json", (now, now))
    caption = collect_status(config)["stages"]["caption"]
    assert caption["shards_pending"] == 3 and caption["workers_recent"] == 3
    assert caption["eta_seconds"] == pytest.approx(2, abs=1.5)
    assert "ETA" in format_status(collect_status(config)) and "wall clock" in format_status(
        collect_status(config)
    )


# -- 7. the download blocklist -----------------------------------------------------------------
def _metadata(tmp_path: Path) -> Path:
    path = tmp_path / "meta.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://example.com/{i}.jpg" for i in range(6)] + ["http://e.com/a#b"],
                "TEXT": [f"t{i}" for i in range(7)],
                "hash": pa.array([100 + i for i in range(7)], pa.int64()),
            }
        ),
        path,
    )
    return path


def test_the_blocklist_drops_listed_urls_and_hashes_and_counts_them(tmp_path, make_config):
    listed = tmp_path / "blocklist.txt"
    listed.write_text(
        "# links removed upstream\nhttp://example.com/1.jpg\n\n  http://e.com/a#b  \n104\n"
    )
    config = load_config(
        make_config(
            tmp_path / "c.yaml",
            tmp_path / "run",
            download={
                "blocklist": [str(listed)],
                "min_aesthetic_score": None,
                "max_punsafe": None,
                "max_pwatermark": None,
            },
        )
    )
    blocklist = load_blocklist(config.download.blocklist)
    assert blocklist.urls == {"http://example.com/1.jpg", "http://e.com/a#b"}
    assert blocklist.hashes == {"104"}
    required = required_columns(config.download, blocklist)
    assert required["hash"] == "hash_col"
    table = read_metadata([_metadata(tmp_path)], list(required), required)
    kept, report = prefilter(table, config.download, blocklist)
    assert report.removed["blocklist"] == 3
    assert sorted(kept["hash"].to_pylist()) == [100, 102, 103, 105]


def test_a_bad_blocklist_is_refused_naming_the_key(tmp_path, make_config):
    with pytest.raises(MetadataError, match=r"missing\.txt: blocklist file not found \(download"):
        load_blocklist([str(tmp_path / "missing.txt")])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MetadataError, match=r"not UTF-8 .*download\.blocklist"):
        load_blocklist([str(tmp_path / "bin.txt")])
    # Hashes need the hash column: its absence names download.hash_col.
    meta = tmp_path / "nohash.parquet"
    pq.write_table(pa.table({"URL": ["http://x/1"], "TEXT": ["t"]}), meta)
    config = load_config(make_config(tmp_path / "c.yaml", tmp_path / "run"))
    required = required_columns(config.download, Blocklist(hashes=frozenset({"1"})))
    with pytest.raises(MetadataError, match=r"'hash' \(config key download\.hash_col\)"):
        read_metadata([meta], list(required), required)


def test_the_blocklist_content_is_part_of_the_download_config(tmp_path, make_config):
    from recaption.stages.download import stage_config

    config = load_config(make_config(tmp_path / "c.yaml", tmp_path / "run"))
    # Without a blocklist the fingerprint is what it was before the key existed.
    assert "blocklist" not in config.download.fingerprint_dict()
    assert "blocklist" not in stage_config(config)
    one = Blocklist(urls=frozenset({"http://a/1"}))
    two = Blocklist(urls=frozenset({"http://a/1", "http://a/2"}))
    assert stage_config(config, one)["blocklist"] != stage_config(config, two)["blocklist"]


def test_the_download_stage_applies_the_blocklist(tmp_path, make_config, lenient_download):
    """The demo world's first three URLs listed: the pre-filter report counts three rows."""
    from recaption.demo.world import generate_world

    world = generate_world(tmp_path / "world", 20, 0)
    urls = pq.read_table(world.metadata, columns=["URL"])["URL"].to_pylist()[:3]
    listed = tmp_path / "blocklist.txt"
    listed.write_text("\n".join(urls) + "\n")
    path = make_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        demo={"n_images": 20, "seed": 0, "world_dir": str(tmp_path / "world")},
        download={**lenient_download, "blocklist": [str(listed)]},
    )
    result = subprocess.run(
        [sys.executable, "-m", "recaption", "download", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]  # demo URLs fail on purpose
    report = json.loads(
        (tmp_path / "run" / "images" / "_ledger" / "download_report.json").read_text()
    )
    assert report["prefilter"]["removed"]["blocklist"] == 3
    assert report["prefilter"]["kept"] == 17
    assert "blocklist (3 URL(s), 0 hash(es)" in result.stderr


# -- 8. the download on a Spark cluster ------------------------------------------------------
def test_spark_master_needs_the_pyspark_distributor(tmp_path, make_config):
    path = make_config(
        tmp_path / "c.yaml", tmp_path / "run", download={"spark_master": "spark://h:7077"}
    )
    with pytest.raises(ConfigError, match=r"download\.spark_master is set .*distributor: pyspark"):
        load_config(path)


def test_spark_master_connects_before_img2dataset_runs(monkeypatch):
    """img2dataset's pyspark distributor uses the active session; connect_spark creates it."""
    import types

    from recaption.stages.download import connect_spark

    built = []

    class Builder:
        def master(self, url):
            built.append(("master", url))
            return self

        def appName(self, name):  # noqa: N802 - pyspark's name
            built.append(("app", name))
            return self

        def getOrCreate(self):  # noqa: N802 - pyspark's name
            built.append(("session",))
            return object()

    sql = types.ModuleType("pyspark.sql")
    sql.SparkSession = types.SimpleNamespace(builder=Builder())
    monkeypatch.setitem(sys.modules, "pyspark", types.ModuleType("pyspark"))
    monkeypatch.setitem(sys.modules, "pyspark.sql", sql)
    connect_spark("spark://head:7077")
    assert built == [("master", "spark://head:7077"), ("app", "recaption-download"), ("session",)]
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    with pytest.raises(RuntimeError, match=r"pyspark is not installed.*download\.distributor"):
        connect_spark("spark://head:7077")


# -- 8. documentation that was wrong ---------------------------------------------------------
def test_the_docs_use_current_commands() -> None:
    docs = {p.name: p.read_text() for p in (REPO / "docs").glob("*.md")}
    docs["README.md"] = (REPO / "README.md").read_text()
    for name, text in docs.items():
        used = re.search(r"huggingface-cli +(login|download|upload)", text)
        assert used is None, f"{name}: {used[0]}: huggingface_hub 1.0 removed it (use hf)"
    assert "hf auth login" in GUIDE and "hf download" in GUIDE
    # PyPI's Linux torch wheels are CUDA builds: the README must not claim that plain
    # `pip install torch` gives the CPU build, and must say how to get it.
    readme = docs["README.md"]
    assert "installs the CPU build" not in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "train.synthetic_caption_ratio" in GUIDE
    slurm = docs["SLURM.md"]
    assert "RECAPTION_MAX_RETRIES" in slurm and "min_done_fraction" in slurm
    assert "pending shards [" not in (REPO / "jobs" / "filter.sbatch").read_text()


def test_the_laion_config_is_documented_key_by_key() -> None:
    """Every train key the LAION config sets is explained in the guide's recipe table."""
    data = yaml.safe_load(LAION.read_text())
    recipe = GUIDE.split("## Training recipe", 1)[1].split("\n## ", 1)[0]
    for key in ("max_steps", "global_batch_size", "learning_rate", "lr_warmup_steps", "ema_decay"):
        assert key in data["train"] and f"`train.{key}`" in recipe, key
