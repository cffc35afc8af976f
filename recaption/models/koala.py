"""The KOALA student: a compressed SDXL U-Net, its initialisation from the teacher, and the
self-attention features that are distilled.

KOALA (Lee et al., 2023, arXiv:2312.04005) keeps SDXL's U-Net layout and removes depth:

==============  ================  ==================================  ==========  =========
preset          layers_per_block  transformer_layers_per_block        mid-block   params
==============  ================  ==================================  ==========  =========
SDXL-Base-1.0   2                 [1, 2, 10]                          yes         2,567M
KOALA-1B        1                 [1, 2, 6]                           yes         1,161M
KOALA-700M      1                 [1, 2, 5]                           no          782M
==============  ================  ==================================  ==========  =========

The student config is the teacher's config with these keys changed (:func:`student_config`),
so the same rule compresses a tiny SDXL. Weights start from the teacher
(:func:`init_student_from_teacher`): same-named tensors, except that in every up block the
student's layer 1 takes the teacher's layer 2 (the first and last layers are kept), and a
shortened transformer stack keeps the teacher's first N blocks.

The feature-distillation loss compares ``transformer_blocks.k.attn1`` (self-attention) outputs
of aligned modules (:func:`aligned_self_attention_pairs`), captured with forward hooks by
:class:`SelfAttentionFeatures`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

logger = logging.getLogger(__name__)

# Config keys each preset changes in the teacher's U-Net config.
PRESETS: dict[str, dict[str, Any]] = {
    "koala-700m": {
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 2, 5],
        "mid_block_type": None,
    },
    "koala-1b": {
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 2, 6],
    },
}

_UP_LAYER = re.compile(r"^(up_blocks\.\d+\.(?:resnets|attentions))\.(\d+)\.")
_SELF_ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attn1$")


def _as_list(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def student_config(teacher_config: dict[str, Any], preset: str) -> dict[str, Any]:
    """The student's ``UNet2DConditionModel`` config: the teacher's with the preset's changes.

    Raises ``ValueError`` for an unknown preset, a teacher that is not SDXL-shaped (three
    blocks, ``layers_per_block`` 2), or a teacher whose transformer stacks are shallower than
    the preset's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown KOALA preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    n_blocks = len(config.get("down_block_types", []))
    teacher_depths = _as_list(config.get("transformer_layers_per_block", 1), n_blocks)
    if n_blocks != 3 or config.get("layers_per_block") != 2:
        raise ValueError(
            "the teacher U-Net is not SDXL-shaped (expected 3 down blocks and layers_per_block "
            f"2, got {n_blocks} and {config.get('layers_per_block')}); KOALA presets compress "
            "an SDXL U-Net such as stabilityai/stable-diffusion-xl-base-1.0"
        )
    changes = PRESETS[preset]
    for depth, teacher_depth in zip(
        changes["transformer_layers_per_block"], teacher_depths, strict=True
    ):
        if not isinstance(teacher_depth, int) or depth > teacher_depth:
            raise ValueError(
                f"preset {preset} keeps transformer depths "
                f"{changes['transformer_layers_per_block']} but the teacher has only "
                f"{teacher_depths}"
            )
    config.update(changes)
    # The up blocks mirror the down blocks; diffusers reverses the list when this is unset.
    config.pop("reverse_transformer_layers_per_block", None)
    return config


def count_parameters(unet_config: dict[str, Any]) -> int:
    """Parameters of a ``UNet2DConditionModel`` built from ``unet_config`` on the meta device.

    No memory is allocated for weights, so full-size SDXL configs count in a second.
    """
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    return sum(p.numel() for p in model.parameters())


def teacher_key(student_key: str) -> str:
    """The teacher tensor/module name that student tensor/module ``student_key`` starts from.

    ``up_blocks.i.{resnets,attentions}.1.*`` maps to layer 2 of the teacher's up block (the
    student has two layers there, the teacher three: first and last kept); every other name,
    transformer blocks included, is the same in both.
    """
    match = _UP_LAYER.match(student_key)
    if match and match.group(2) == "1":
        return f"{match.group(1)}.2.{student_key[match.end() :]}"
    return student_key


def init_student_from_teacher(teacher: UNet2DConditionModel, preset: str) -> UNet2DConditionModel:
    """Build the KOALA student of ``teacher`` for ``preset`` with weights mapped from it.

    Every student tensor is copied from the teacher tensor named by :func:`teacher_key`; a
    missing or differently shaped teacher tensor is an error (the mapping must be total).
    The student is float32 and in training mode.
    """
    import torch
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(student_config(dict(teacher.config), preset))
    teacher_state = teacher.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in student.state_dict().items():
        source = teacher_key(name)
        if source not in teacher_state:
            raise ValueError(f"student tensor {name}: teacher has no tensor {source}")
        if teacher_state[source].shape != tensor.shape:
            raise ValueError(
                f"student tensor {name} {tuple(tensor.shape)} does not match teacher tensor "
                f"{source} {tuple(teacher_state[source].shape)}"
            )
        mapped[name] = teacher_state[source].detach().to(torch.float32)
    student.load_state_dict(mapped, strict=True)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    logger.info(
        "student %s: %.1fM parameters (teacher %.1fM, %.0f%%)",
        preset,
        n_student / 1e6,
        n_teacher / 1e6,
        100 * n_student / max(n_teacher, 1),
    )
    return student.train()


def aligned_self_attention_pairs(
    student: torch.nn.Module, teacher: torch.nn.Module
) -> list[tuple[str, str]]:
    """``(student module, teacher module)`` names of the self-attention layers to distil.

    Student ``...transformer_blocks.k.attn1`` pairs with the teacher module of the same name,
    except in up blocks, where the student's attention 1 pairs with the teacher's attention 2
    (:func:`teacher_key`).
    """
    teacher_modules = dict(teacher.named_modules())
    pairs = []
    for name, _module in student.named_modules():
        if not _SELF_ATTENTION.search(name):
            continue
        source = teacher_key(name + ".")[:-1]
        if source not in teacher_modules:
            raise ValueError(f"student self-attention {name} has no teacher module {source}")
        pairs.append((name, source))
    if not pairs:
        raise ValueError("the student U-Net has no transformer_blocks.k.attn1 modules to distil")
    return pairs


class SelfAttentionFeatures:
    """Forward hooks that keep the outputs of named modules while recording.

    >>> name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    >>> features = SelfAttentionFeatures(unet, [name])
    >>> with features.record():
    ...     unet(latents, t, embeddings, added_cond_kwargs=cond)
    >>> features.outputs[name].shape

    Hooks store nothing outside :meth:`record`, so the forward passes that gradient
    checkpointing repeats during backward do not overwrite (or keep alive) the features.
    """

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[0]} to hook")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._recording = False
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in self.names
        ]

    def _hook(self, name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if self._recording:
                self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, torch.Tensor]]:
        """Capture the hooked outputs of the forward passes run inside the block."""
        self.outputs = {}
        self._recording = True
        try:
            yield self.outputs
        finally:
            self._recording = False

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
