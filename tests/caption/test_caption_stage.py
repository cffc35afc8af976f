"""The caption stage on img2dataset-layout shards with tiny real LLaVA models."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.schemas import CAPTION_SCHEMA
from recaption.stages.caption import PROMPT_PRESETS, finish_tokens


def tar_keys(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        keys = [m.name.split(".", 1)[0] for m in tar.getmembers()]
    return list(dict.fromkeys(keys))


def test_demo_shards_get_one_caption_row_per_sample(
    demo_run, make_config, caption_stage, captions_of
) -> None:
    config = make_config(demo_run)
    summary = caption_stage(config)
    assert summary.ok and sorted(summary.shards_ok) == ["00000", "00001", "00002"]
    assert summary.samples_ok == 18 and summary.samples_failed == 0

    captions = captions_of(demo_run)
    # 00003 has a tar but no download marker: not an input yet.
    assert sorted(captions) == ["00000", "00001", "00002"]
    assert not (demo_run / "captions" / "00003.parquet").exists()
    for shard, rows in captions.items():
        table = pq.read_table(demo_run / "captions" / f"{shard}.parquet")
        assert table.schema.equals(CAPTION_SCHEMA)
        images = demo_run / "images" / f"{shard}.tar"
        assert [r["key"] for r in rows] == tar_keys(images)
        for row in rows:
            assert row["status"] == "ok" and row["error"] is None
            assert isinstance(row["caption"], str)
            assert row["model"] == "demo:tiny-llava-1.5"
            assert row["prompt"] == PROMPT_PRESETS["dense"]
            assert row["original_text"].startswith("a picture number")
            assert row["finish_reason"] in ("stop", "length")
            assert 1 <= row["n_new_tokens"] <= 6
            assert row["finish_reason"] == "stop" or row["n_new_tokens"] == 6
            assert row["n_prompt_tokens"] > 16  # 16 image tokens plus the chat prompt
        stats = json.loads((demo_run / "captions" / f"{shard}_stats.json").read_text())
        assert stats["n_input"] == len(rows) and stats["n_ok"] == len(rows)
        assert stats["n_failed"] == 0
        assert stats["images_per_s"] > 0 and stats["new_tokens_per_s"] > 0
        assert 0 <= stats["seconds_waiting_for_images"] <= stats["seconds"]
        assert stats["n_new_tokens"] == sum(r["n_new_tokens"] for r in rows)

    again = caption_stage(config)
    assert again.ok and again.shards_done_before == 3 and not again.shards_ok


def test_bad_inputs_become_error_rows_and_the_rest_is_captioned(
    tmp_path, make_config, caption_stage, captions_of, shard_writer, samples, bad_inputs
) -> None:
    run_dir = tmp_path / "run"
    good = samples(5, 6)
    bad = [s for s, _ in bad_inputs]
    expected = {s["key"]: reason for s, reason in bad_inputs}
    # Bad samples spread through the batches, between good ones.
    padded_good = good + [None] * (len(bad) - len(good))
    mixed = [x for pair in zip(bad, padded_good, strict=True) for x in pair if x]
    shard_writer(run_dir / "images", "00000", mixed)
    shard_writer(run_dir / "images", "00001", good)  # the same good images, alone
    summary = caption_stage(make_config(run_dir, batch_size=4))
    assert summary.ok, summary.describe()

    captions = captions_of(run_dir)
    rows = {r["key"]: r for r in captions["00000"]}
    assert [r["key"] for r in captions["00000"]] == [s["key"] for s in mixed]
    for key, reason in expected.items():
        row = rows[key]
        if reason is None:
            assert row["status"] == "ok", (key, row["error"])
            assert row["caption"] is not None and row["n_new_tokens"] >= 1
        else:
            assert row["status"] == "error", key
            assert reason in row["error"], (key, row["error"])
            assert row["caption"] is None and row["finish_reason"] is None
            assert row["original_text"] == key.split("_", 1)[1]
    # Good images in batches with bad ones get exactly the captions they get alone.
    alone = {r["key"]: r["caption"] for r in captions["00001"]}
    assert {k: rows[k]["caption"] for k in alone} == alone
    stats = json.loads((run_dir / "captions" / "00000_stats.json").read_text())
    n_errors = sum(reason is not None for reason in expected.values())
    assert stats["n_failed"] == n_errors == 6
    assert stats["n_input"] == len(mixed)
    assert sum(stats["errors"].values()) == n_errors


@pytest.mark.parametrize("cut", ["mid_member", "at_member_boundary"])
def test_truncated_tar_fails_only_its_shard_and_the_command_exits_1(
    demo_run, make_config, captions_of, cut, caplog
) -> None:
    tar_path = demo_run / "images" / "00001.tar"
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    # mid_member: inside an image's data; at_member_boundary: a clean cut between samples,
    # which only the download parquet's list of successful keys can reveal.
    size = middle.offset_data + 100 if cut == "mid_member" else middle.offset
    tar_path.write_bytes(data[:size])

    code = main(["caption", str(make_config(demo_run)), "-q"])
    assert code == 1
    assert sorted(captions_of(demo_run)) == ["00000", "00002"]
    assert not (demo_run / "captions" / "00001_stats.json").exists()
    assert not (demo_run / "captions" / "00001.parquet").exists()
    failed = json.loads((demo_run / "captions" / "_ledger" / "00001_failed.json").read_text())
    assert "00001.tar" in failed["error"] and "rerun the download" in failed["error"]


def test_missing_or_wrong_checkpoint_stops_before_any_shard(
    demo_run, make_config, tmp_path
) -> None:
    from transformers import LlamaConfig

    config = make_config(demo_run)
    assert main(["caption", str(config), "caption.model=/no/such/llava", "-q"]) == 2
    not_a_vlm = tmp_path / "text-only"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        not_a_vlm
    )
    assert main(["caption", str(config), f"caption.model={not_a_vlm}", "-q"]) == 2
    no_config = tmp_path / "empty-folder"
    no_config.mkdir()
    assert main(["caption", str(config), f"caption.model={no_config}", "-q"]) == 2
    assert not (demo_run / "captions").exists()


def test_checkpoint_errors_name_the_problem(demo_run, make_config, caption_stage, tmp_path):
    from transformers import LlamaConfig

    config = make_config(demo_run)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        caption_stage(config, "caption.model=/no/such/llava")
    not_a_vlm = tmp_path / "text-only"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        not_a_vlm
    )
    with pytest.raises(RuntimeError, match="not a vision-language model"):
        caption_stage(config, f"caption.model={not_a_vlm}")
    with pytest.raises(ValueError, match=r"caption\.custom_prompt is empty"):
        caption_stage(config, "caption.prompt=custom")


def test_batched_generation_equals_one_image_at_a_time(
    tmp_path, make_config, caption_stage, captions_of, shard_writer, samples
) -> None:
    # A prompt with the alt-text makes prompt lengths differ, so batches are really padded.
    custom = "Describe this image. Its original caption: {alt_text}"
    runs = {}
    for batch_size, workers in ((1, 0), (5, 2)):
        run_dir = tmp_path / f"b{batch_size}"
        items = samples(4, 9)
        for i, item in enumerate(items):
            item["text"] = "red circle " * (i % 4) + f"number {i}"
        shard_writer(run_dir / "images", "00000", items)
        config = make_config(
            run_dir,
            batch_size=batch_size,
            num_workers=workers,
            prompt="custom",
            custom_prompt=custom,
            max_new_tokens=8,
        )
        assert caption_stage(config).ok
        runs[batch_size] = captions_of(run_dir)["00000"]
    single, batched = runs[1], runs[5]
    assert len({r["n_prompt_tokens"] for r in batched}) > 2
    assert batched[3]["prompt"] == custom.replace(
        "{alt_text}", "red circle red circle red circle number 3"
    )
    assert batched == single


def test_llava_next_goes_through_the_same_stage(
    tmp_path, make_config, caption_stage, captions_of, shard_writer, samples
) -> None:
    runs = {}
    for batch_size in (1, 4):
        run_dir = tmp_path / f"next{batch_size}"
        shard_writer(run_dir / "images", "00000", samples(6, 6))
        config = make_config(run_dir, model="demo:tiny-llava-next", batch_size=batch_size)
        assert caption_stage(config).ok
        runs[batch_size] = captions_of(run_dir)["00000"]
    rows = runs[4]
    assert all(r["status"] == "ok" and r["model"] == "demo:tiny-llava-next" for r in rows)
    # NeXT tiles each image by its aspect ratio: prompt lengths differ, batches are padded.
    assert len({r["n_prompt_tokens"] for r in rows}) > 1
    assert runs[1] == runs[4]


def test_sampling_is_reproducible_per_shard(
    demo_run, make_config, caption_stage, captions_of, tmp_path
) -> None:
    config = make_config(demo_run, do_sample=True, temperature=1.5, seed=3, max_new_tokens=8)
    assert caption_stage(config).ok
    first = captions_of(demo_run)
    greedy_dir = tmp_path / "greedy"
    import shutil

    shutil.copytree(demo_run / "images", greedy_dir / "images")
    assert caption_stage(make_config(greedy_dir, max_new_tokens=8)).ok
    assert captions_of(greedy_dir) != first  # sampling does sample
    shutil.rmtree(demo_run / "captions")
    assert caption_stage(config).ok
    assert captions_of(demo_run) == first


def test_finish_reason_and_token_counts() -> None:
    eos = {2}
    assert finish_tokens([5, 6, 2, 0, 0], eos) == ([5, 6], 3, "stop")
    assert finish_tokens([5, 6, 7], eos) == ([5, 6, 7], 3, "length")
    assert finish_tokens([2, 0], eos) == ([], 1, "stop")


def test_pickled_weights_are_refused(demo_run, make_config, caption_stage, models_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    caption_stage(make_config(demo_run))  # builds the tiny model into models_dir
    pickled = tmp_path / "pickled-llava"
    shutil.copytree(models_dir / "tiny-llava-1.5", pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    other = tmp_path / "other"
    shutil.copytree(demo_run / "images", other / "images")
    with pytest.raises(RuntimeError, match=r"no \.safetensors weights"):
        caption_stage(make_config(other), f"caption.model={pickled}")
    assert not (other / "captions").exists()  # stopped before any shard was touched


def test_original_text_falls_back_to_the_json_caption() -> None:
    from recaption.shards import RawSample

    assert RawSample("k", {"txt": b"from txt", "json": b'{"caption": "x"}'}).alt_text() == (
        "from txt"
    )
    assert RawSample("k", {"json": b'{"caption": "from json"}'}).alt_text() == "from json"
    assert RawSample("k", {"json": b"not json"}).alt_text() == ""
