"""The training cache (`recaption encode`, train.cache): contents, invalidation, equivalence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors import safe_open

from recaption.config import load_config
from recaption.ledger import ConfigMismatchError
from recaption.stages import StageContext
from recaption.stages import run as run_stage
from tests.koala.conftest import write_shard

EXACT = {
    "center_crop": True,
    "random_flip": False,
    "synthetic_caption_ratio": 1.0,
    "empty_prompt_ratio": 0.0,
    "max_steps": 3,
    "log_every": 1,
    "cache_dtype": "float32",
    "use_ema": False,
}


def _read(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as f:
        keys = json.loads(f.metadata()["keys"])
        names = list(f.keys())  # a safetensors file handle is not iterable
        return keys, {name: tuple(f.get_slice(name).get_shape()) for name in names}


def test_encode_writes_latents_and_embeddings_per_merged_shard(make_run) -> None:
    config, path = make_run(shards=2, per_shard=5, train={"cache": True, "batch_size": 2})
    summary = run_stage("encode", StageContext(config))
    assert summary.shards_ok == ["00000", "00001"] and summary.samples_failed == 1  # corrupt jpg
    keys, shapes = _read(config.cache_dir / "00000.safetensors")
    assert len(keys) == 4 and keys == sorted(keys)
    latent = config.train.resolution // 8
    assert shapes["latents_mean"] == shapes["latents_std"] == (4, 4, latent, latent)
    assert shapes["prompt_embeds"][:2] == (4, 77) and shapes["time_ids"] == (4, 6)
    assert shapes["empty_prompt_embeds"][0] == 1
    assert "prompt_embeds_original" in shapes  # synthetic_caption_ratio < 1: both captions
    from recaption.status import collect_status

    assert collect_status(config)["stages"]["encode"]["shards_done"] == 2
    # Without train.cache the stage has nothing to do.
    off = load_config(path, ["train.cache=false"])
    assert run_stage("encode", StageContext(off)).shards_ok == []


def test_a_changed_caption_redoes_its_shard_only_and_a_changed_teacher_is_refused(
    make_run, tmp_path: Path
) -> None:
    config, path = make_run(shards=2, per_shard=4, corrupt=False, train={"cache": True})
    assert run_stage("encode", StageContext(config)).ok
    write_shard(config.stage_dir("merge") / "00001.tar", 4, seed=1, caption_tail=", in pencil")
    again = run_stage("encode", StageContext(config))
    assert again.shards_ok == ["00001"] and again.shards_done_before == 1
    # Training refuses a cache that lags behind the merged dataset.
    write_shard(config.stage_dir("merge") / "00000.tar", 4, seed=0, caption_tail=", in ink")
    with pytest.raises(FileNotFoundError, match=r"not encoded.*00000.*recaption encode"):
        run_stage("train", StageContext(config))
    other = tmp_path / "other-teacher"
    other.symlink_to(Path(config.demo_models_dir) / "tiny-sdxl")
    changed = load_config(path, [f"train.teacher={other}"])
    with pytest.raises(ConfigMismatchError, match=r"train\.teacher"):
        run_stage("encode", StageContext(changed))


def test_training_from_the_cache_equals_training_without_it(
    make_run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain, _ = make_run(shards=2, per_shard=6, corrupt=False, train=EXACT,
                        run_dir=tmp_path / "plain")  # fmt: skip
    assert run_stage("train", StageContext(plain)).ok
    cached, _ = make_run(shards=2, per_shard=6, corrupt=False, train={**EXACT, "cache": True},
                         run_dir=tmp_path / "cached")  # fmt: skip
    assert run_stage("encode", StageContext(cached)).ok
    with caplog.at_level(logging.INFO):
        assert run_stage("train", StageContext(cached)).ok
    assert "the VAE and text encoders are not loaded" in caplog.text
    log = [json.loads(line) for line in (plain.koala_dir / "train_log.jsonl").open()]
    from_cache = [json.loads(line) for line in (cached.koala_dir / "train_log.jsonl").open()]
    assert [r["step"] for r in from_cache] == [1, 2, 3]
    for a, b in zip(log, from_cache, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert (cached.koala_dir / "pipeline" / "vae").is_dir()  # the export still has the VAE
