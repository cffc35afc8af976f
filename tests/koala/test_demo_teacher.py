"""The shipped demo teacher (``shapes-sdxl``) and CLIP (``shapes-clip``): they load through the
real ``from_pretrained`` paths, keep the tiny SDXL U-Net config, tokenize any text with one
token per world word, and have learnt the demo world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recaption.demo import world
from recaption.demo.tiny_models import TINY_SDXL_UNET_CONFIG
from recaption.demo.train_sdxl import (
    METADATA_FILE,
    judge_colours,
    judge_prompts,
    train_sdxl,
    world_words,
)

WEIGHTS = Path(world.__file__).parent / "weights"
SDXL_DIR = WEIGHTS / "shapes-sdxl"
CLIP_DIR = WEIGHTS / "shapes-clip"

ANY_SCRIPT = "赤い丸 🙂 круг دائرة Ünïcödé ½ ñ <b>&amp;</b>"


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_teacher_has_the_tiny_sdxl_layout(teacher) -> None:
    config = dict(teacher.unet.config)
    expected = json.loads(json.dumps(TINY_SDXL_UNET_CONFIG))
    assert {k: json.loads(json.dumps(config[k])) for k in expected} == expected
    assert teacher.unet.dtype == torch.float32  # stored in fp16, loaded as fp32
    assert type(teacher.text_encoder).__name__ == "CLIPTextModel"
    assert type(teacher.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(teacher.scheduler).__name__ == "EulerDiscreteScheduler"
    assert teacher.vae.config.shift_factor is None
    for name in ("tokenizer", "tokenizer_2"):
        assert (SDXL_DIR / name / "vocab.json").exists()
        assert (SDXL_DIR / name / "merges.txt").exists()
    record = json.loads((SDXL_DIR / METADATA_FILE).read_text())
    assert record["world_version"] == world.WORLD_VERSION
    assert record["train_world_seeds"]["first"] >= 10_000


def test_tokenizer_has_one_token_per_world_word_and_takes_any_script(teacher) -> None:
    words = world_words()
    assert {"red", "circle", "centre", "background", "gradient", "hexagon"} <= set(words)
    for tokenizer in (teacher.tokenizer, teacher.tokenizer_2):
        assert tokenizer.model_max_length == 77
        split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
        assert not split, split
        ids = tokenizer(ANY_SCRIPT).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in ids[1:-1]  # no unknown token (it is <|endoftext|>)
        # CLIP's decode puts a space at every word end (punctuation is its own word).
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == ANY_SCRIPT.lower().replace(" ", "")


def test_teacher_draws_the_colour_asked_for_above_chance(teacher) -> None:
    """16 held-out "a large red circle in the centre on a plain blue background" prompts, 10
    steps: the shipped teacher draws the asked object colour 8 of 16 times (chance 1/7). It is a
    weak teacher (recaption_demo.json: about 40% on 32 prompts at 20 steps); the floor is set
    well above chance, below what it measures."""
    prompts = judge_prompts(16, seed=3)
    result = judge_colours(teacher, prompts, num_inference_steps=10, guidance_scale=5.0, seed=0)
    assert result["object_colour_accuracy"] >= 0.35, result


def test_clip_scores_the_true_caption_higher() -> None:
    from transformers import CLIPModel, CLIPProcessor

    from recaption.demo.train_clip import evaluate_clip

    model = CLIPModel.from_pretrained(CLIP_DIR)
    processor = CLIPProcessor.from_pretrained(CLIP_DIR)
    assert len(processor.tokenizer.tokenize("purple")) == 1
    result = evaluate_clip(model, processor, n=64)
    assert result["retrieval_accuracy_1_of_16"] >= 0.5, result
    assert result["colour_swap_accuracy"] >= 0.7, result


def test_train_sdxl_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "teacher"
    record = train_sdxl(out, steps=2, vae_steps=1, batch_size=2, vae_batch_size=2, judge_n=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert dict(pipe.unet.config)["transformer_layers_per_block"] == [1, 2, 10]
    assert record["steps"] == 2 and record["world_version"] == world.WORLD_VERSION
    assert json.loads((out / METADATA_FILE).read_text())["train_world_seeds"]["n_images"] > 0
