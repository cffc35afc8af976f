"""The KOALA student: configs, parameter counts, init from the teacher, feature hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from recaption.demo.tiny_models import TINY_SDXL_UNET_CONFIG
from recaption.models.koala import (
    SelfAttentionFeatures,
    aligned_self_attention_pairs,
    count_parameters,
    init_student_from_teacher,
    student_config,
    teacher_key,
)
from recaption.models.sdxl import SDXL_BASE_UNET_CONFIG


@pytest.fixture(scope="module")
def tiny_teacher() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(1)
    cond = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}
    return torch.randn(batch, 4, 8, 8), torch.tensor([10, 500]), torch.randn(batch, 7, 64), cond


def test_full_size_parameter_counts_match_the_model_card() -> None:
    counts = {
        "sdxl": count_parameters(SDXL_BASE_UNET_CONFIG),
        "koala-1b": count_parameters(student_config(SDXL_BASE_UNET_CONFIG, "koala-1b")),
        "koala-700m": count_parameters(student_config(SDXL_BASE_UNET_CONFIG, "koala-700m")),
    }
    # The model card's table, which truncates to whole millions (KOALA-700M has 782.8M).
    card_params_m = {"sdxl": 2567, "koala-1b": 1161, "koala-700m": 782}
    assert {k: v // 1_000_000 for k, v in counts.items()} == card_params_m


def test_presets_change_only_depth_and_mid_block() -> None:
    koala_700m = student_config(SDXL_BASE_UNET_CONFIG, "koala-700m")
    koala_1b = student_config(SDXL_BASE_UNET_CONFIG, "koala-1b")
    assert koala_700m["layers_per_block"] == koala_1b["layers_per_block"] == 1
    assert koala_700m["transformer_layers_per_block"] == [1, 2, 5]
    assert koala_1b["transformer_layers_per_block"] == [1, 2, 6]
    assert koala_700m["mid_block_type"] is None
    assert koala_1b["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    changed = {k for k in koala_700m if koala_700m[k] != SDXL_BASE_UNET_CONFIG.get(k)}
    assert changed == {"layers_per_block", "transformer_layers_per_block", "mid_block_type"}


def test_unknown_preset_and_non_sdxl_teacher_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown KOALA preset 'koala-300m'"):
        student_config(SDXL_BASE_UNET_CONFIG, "koala-300m")
    sd15_like = {**SDXL_BASE_UNET_CONFIG, "down_block_types": ["CrossAttnDownBlock2D"] * 4}
    with pytest.raises(ValueError, match="not SDXL-shaped"):
        student_config(sd15_like, "koala-700m")
    shallow = {**SDXL_BASE_UNET_CONFIG, "transformer_layers_per_block": [1, 2, 4]}
    with pytest.raises(ValueError, match="teacher has only"):
        student_config(shallow, "koala-700m")


def test_teacher_key_maps_up_block_layer_1_to_teacher_layer_2() -> None:
    assert teacher_key("up_blocks.0.resnets.1.conv1.weight") == "up_blocks.0.resnets.2.conv1.weight"
    assert (
        teacher_key("up_blocks.1.attentions.1.transformer_blocks.3.attn1.to_q.weight")
        == "up_blocks.1.attentions.2.transformer_blocks.3.attn1.to_q.weight"
    )
    for same in (
        "up_blocks.0.resnets.0.conv1.weight",
        "down_blocks.2.attentions.0.transformer_blocks.4.attn1.to_k.weight",
        "mid_block.attentions.0.transformer_blocks.5.ff.net.2.weight",
        "up_blocks.2.upsamplers.0.conv.weight",
    ):
        assert teacher_key(same) == same


@pytest.mark.parametrize("preset", ["koala-700m", "koala-1b"])
def test_student_init_equals_the_mapped_teacher_weights(
    tiny_teacher: UNet2DConditionModel, preset: str
) -> None:
    student = init_student_from_teacher(tiny_teacher, preset)
    teacher_state = tiny_teacher.state_dict()
    student_state = student.state_dict()
    for name, tensor in student_state.items():
        assert torch.equal(tensor, teacher_state[teacher_key(name)]), name
    # Layer 1 of an up block comes from the teacher's layer 2, not its layer 1.
    w = student_state["up_blocks.0.resnets.1.conv1.weight"]
    assert torch.equal(w, teacher_state["up_blocks.0.resnets.2.conv1.weight"])
    assert not torch.equal(w, teacher_state["up_blocks.0.resnets.1.conv1.weight"])
    depth = 5 if preset == "koala-700m" else 6
    stack = student.down_blocks[2].attentions[0].transformer_blocks
    assert len(stack) == depth
    assert (student.mid_block is None) == (preset == "koala-700m")
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in tiny_teacher.parameters()
    )


@pytest.mark.parametrize("preset", ["koala-700m", "koala-1b"])
def test_hooks_capture_every_aligned_self_attention_pair(
    tiny_teacher: UNet2DConditionModel, preset: str
) -> None:
    student = init_student_from_teacher(tiny_teacher, preset)
    pairs = aligned_self_attention_pairs(student, tiny_teacher)
    # down 1: 2 blocks, down 2: d; up 0: 2 attentions x d; up 1: 2 x 2; mid: d (1B only)
    d = 5 if preset == "koala-700m" else 6
    assert len(pairs) == 2 + d + 2 * d + 4 + (d if preset == "koala-1b" else 0)
    assert all(s.endswith(".attn1") and t.endswith(".attn1") for s, t in pairs)
    assert (
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1",
    ) in pairs
    student_features = SelfAttentionFeatures(student, [s for s, _ in pairs])
    teacher_features = SelfAttentionFeatures(tiny_teacher, [t for _, t in pairs])
    x, t, text, cond = _inputs()
    with torch.no_grad():
        student(x, t, text, added_cond_kwargs=cond)  # outside record(): nothing kept
        assert student_features.outputs == {}
        with student_features.record(), teacher_features.record():
            student(x, t, text, added_cond_kwargs=cond)
            tiny_teacher(x, t, text, added_cond_kwargs=cond)
    assert set(student_features.outputs) == {s for s, _ in pairs}
    assert set(teacher_features.outputs) == {t for _, t in pairs}
    for s, t in pairs:
        assert student_features.outputs[s].shape == teacher_features.outputs[t].shape, s
    student_features.remove()
    teacher_features.remove()


def test_tiny_sdxl_folder_loads_as_an_sdxl_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from recaption.demo.tiny_models import build_tiny_sdxl

    build_tiny_sdxl(tmp_path / "sdxl")
    files = {p.relative_to(tmp_path / "sdxl").as_posix() for p in (tmp_path / "sdxl").rglob("*")}
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith(".bin")]
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.vae_scale_factor == 8
    embeds, _, pooled, _ = pipe.encode_prompt(["a red circle"], do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)


def test_feature_loss_reaches_the_student_with_gradient_checkpointing(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    student = init_student_from_teacher(tiny_teacher, "koala-700m")
    student.enable_gradient_checkpointing()
    pairs = aligned_self_attention_pairs(student, tiny_teacher)
    student_features = SelfAttentionFeatures(student, [s for s, _ in pairs])
    teacher_features = SelfAttentionFeatures(tiny_teacher, [t for _, t in pairs])
    x, t, text, cond = _inputs()
    with torch.no_grad(), teacher_features.record():
        tiny_teacher(x, t, text, added_cond_kwargs=cond)
    with student_features.record():
        student(x, t, text, added_cond_kwargs=cond)
    loss = sum(
        torch.nn.functional.mse_loss(student_features.outputs[s], teacher_features.outputs[t])
        for s, t in pairs
    )
    loss.backward()  # recomputation during backward must not record again
    assert len(student_features.outputs) == len(pairs)
    deep = student.up_blocks[0].attentions[1].transformer_blocks[4].attn1.to_q.weight
    assert deep.grad is not None and deep.grad.abs().sum() > 0
