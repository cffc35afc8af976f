"""What `recaption publish` sends by default (metadata, not third-party images), and the terms
the dataset card and the exported KOALA model card state.

The Hub is never reached: a recording stand-in replaces ``HfApi``.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import yaml

from recaption.config import load_config
from recaption.dataset_card import caption_model_terms, model_card_fields, teacher_terms
from recaption.driver import StageContext
from recaption.publish import MANIFEST, dataset_files, publish_dataset
from recaption.stages import run as run_stage


@pytest.fixture
def merged(run_inputs):
    """A filtered and merged run of two shards."""
    config, _ = run_inputs
    assert run_stage("filter", StageContext(config)).ok
    assert run_stage("merge", StageContext(config)).ok
    return config


@pytest.fixture
def hub(monkeypatch):
    """A stand-in for ``HfApi`` that records what would be created and uploaded."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class RecordingApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))

        def upload_large_folder(self, **kw):
            calls.append(("upload", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return calls


def _uploaded(calls: list[tuple[str, dict]]) -> set[str]:
    (upload,) = [kw for name, kw in calls if name == "upload"]
    return set(upload["allow_patterns"])


def test_publish_sends_the_metadata_and_no_image_by_default(merged, hub):
    everything = {MANIFEST, *dataset_files(merged.dataset_dir)}
    tars = {rel for rel in everything if rel.startswith("webdataset/")}
    assert tars and any(rel.startswith("parquet/") for rel in everything)

    publish_dataset(merged, "org/name")
    sent = _uploaded(hub)
    assert sent == everything - tars
    assert {"README.md", "stats.json", MANIFEST} <= sent


def test_publish_with_images_sends_the_webdataset_too(merged, hub):
    publish_dataset(merged, "org/name", include_images=True)
    assert _uploaded(hub) == {MANIFEST, *dataset_files(merged.dataset_dir)}


def test_the_dry_run_names_what_it_leaves_out(merged, hub, caplog):
    caplog.set_level(logging.INFO, logger="recaption.publish")
    publish_dataset(merged, "org/name", dry_run=True)
    assert hub == []
    messages = [r.getMessage() for r in caplog.records]
    would_send = [m.split()[-1] for m in messages if re.fullmatch(r"\s+\d+\s+\S+", m)]
    left_out = [m.split()[-1] for m in messages if m.lstrip().startswith("(not uploaded)")]
    assert "parquet/00000.parquet" in would_send and "README.md" in would_send
    assert not any(rel.startswith("webdataset/") for rel in would_send)
    assert left_out == ["webdataset/00000.tar", "webdataset/00001.tar"]
    assert any("not uploaded: 2 image file(s)" in m and "--with-images" in m for m in messages)


def test_parquet_with_embedded_images_is_not_published_as_metadata(tmp_path, run_inputs, hub):
    config, _ = run_inputs
    path = config.source
    data = yaml.safe_load(path.read_text())
    data["merge"]["embed_images_in_parquet"] = True
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert run_stage("filter", StageContext(config)).ok
    assert run_stage("merge", StageContext(config)).ok
    with pytest.raises(RuntimeError, match=r"embed the images.*merge\.embed_images_in_parquet"):
        publish_dataset(config, "org/name")
    assert hub == []
    publish_dataset(config, "org/name", include_images=True)
    assert any(rel.startswith("parquet/") for rel in _uploaded(hub))


def test_the_dataset_card_states_every_part_s_terms(merged):
    card = (merged.dataset_dir / "README.md").read_text()
    terms = card.split("## Licenses, terms and safety", 1)[1]
    assert "third-party works" in terms and "metadata only" in terms
    assert "--with-images" in terms
    # The synthetic captions: the caption model's terms (LLaVA-1.5's, the default model).
    assert merged.caption.model == "llava-hf/llava-1.5-7b-hf"
    assert "Llama 2 Community License" in terms
    assert "Re-LAION-5B" in terms and "download.blocklist" in terms
    assert "contact Hugging Face" in terms and "sha256sum -c --ignore-missing" in terms


def test_known_caption_models_and_teachers_have_their_terms():
    assert "Llama 2 Community License" in caption_model_terms("llava-hf/llava-1.5-7b-hf")
    assert "Apache-2.0" in caption_model_terms("llava-hf/llava-v1.6-mistral-7b-hf")
    assert "not known" in caption_model_terms("someone/else")
    assert teacher_terms("stabilityai/stable-diffusion-xl-base-1.0") == (
        "openrail++",
        "CreativeML Open RAIL++-M",
    )
    assert teacher_terms("demo:tiny-sdxl")[0] == "other"


def test_the_model_card_carries_the_teacher_license_and_the_caption_terms(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "stats.json").write_text(json.dumps({"caption_model": ["llava-hf/llava-1.5-7b-hf"]}))
    fields = model_card_fields("stabilityai/stable-diffusion-xl-base-1.0", dataset)
    assert fields["license_front_matter"] == "license: openrail++"
    assert "CreativeML Open RAIL++-M" in fields["license_text"]
    assert "Attachment A" in fields["license_text"]
    assert "Llama 2 Community License" in fields["data_text"]
    other = model_card_fields("my/teacher", tmp_path / "nowhere")
    assert other["license_front_matter"] == "license: other\nlicense_name: teacher-terms"
    assert "not recorded" in other["data_text"]


def test_the_exported_pipeline_has_a_model_card_with_its_license(tmp_path):
    """save_pipeline writes README.md with the license front matter the Hub reads."""
    from diffusers import StableDiffusionXLPipeline

    from recaption.config import TrainConfig
    from recaption.demo.models import build_demo_model
    from recaption.stages.train import save_pipeline

    teacher_dir = build_demo_model("tiny-sdxl", tmp_path / "tiny-sdxl")
    teacher = StableDiffusionXLPipeline.from_pretrained(teacher_dir)
    run_dir = tmp_path / "run"
    (run_dir / "dataset").mkdir(parents=True)
    (run_dir / "dataset" / "stats.json").write_text(
        json.dumps({"caption_model": ["llava-hf/llava-1.5-7b-hf"]})
    )
    cfg = TrainConfig(teacher="stabilityai/stable-diffusion-xl-base-1.0")
    save_pipeline(teacher, teacher.unet, run_dir / "koala" / "pipeline", cfg)
    card = (run_dir / "koala" / "pipeline" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "openrail++" and front["library_name"] == "diffusers"
    assert "## License and use restrictions" in card and "Attachment A" in card
    assert "## Training data" in card and "Llama 2 Community License" in card


def test_the_card_says_what_the_blocklist_removed(merged):
    from recaption.dataset_card import render_card

    stats = json.loads((merged.dataset_dir / "stats.json").read_text())
    assert "report was not found" in render_card(merged, stats)  # this run has none
    report = merged.images_dir / "_ledger" / "download_report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"prefilter": {"removed": {"url_missing": 0}}}))
    assert "downloaded without a blocklist" in render_card(merged, stats)
    report.write_text(json.dumps({"prefilter": {"removed": {"url_missing": 0, "blocklist": 7}}}))
    data = merged.model_dump(mode="json")
    data["download"]["blocklist"] = ["/lists/relaion-removed.txt"]
    config = type(merged).model_validate(data)
    assert "removed 7 metadata row(s)" in render_card(config, stats)
    assert "relaion-removed.txt" in render_card(config, stats)
