"""Train the demo's captioner: a tiny LLaVA-1.5 that has learned to describe the demo world.

The model is a real ``LlavaForConditionalGeneration`` (a tiny FocalNet vision tower on 128 px
squares, a 3-layer Llama) with a ``LlavaProcessor`` that pads images to a square as LLaVA-1.5
does, so no shape at the image's edge is cropped away. It is trained from
random weights on demo-world images drawn fresh every step (seeds from ``TRAIN_SEED_BASE``,
never the ones a demo run or a test draws its world with), each paired with a descriptive
caption :func:`recaption.demo.describe.describe` writes from the image's ground truth. Images
go through what the pipeline does to them first: JPEG at img2dataset's quality, then
img2dataset's ``keep_ratio`` resize to the demo's 96 px. The loss is on the answer only, after
the llava-hf chat template with one of the caption stage's instructions.

The folder written is a ``save_pretrained`` checkpoint that the caption stage loads with
``from_pretrained`` like ``llava-hf/llava-1.5-7b-hf``. ``python -m recaption.demo.train_models``
reproduces the shipped weights.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from recaption.demo.describe import describe
from recaption.demo.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    WORLD_VERSION,
    draw_image,
    object_map,
)

logger = logging.getLogger(__name__)

TRAIN_SEED_BASE = 1_000_000
EVAL_SEED = 7_777
DOWNLOAD_SIZE = 96  # the demo's img2dataset ``image_size``: every image's short side
IMAGE_SIZE = 128  # the processor's square: the image padded to a square, then resized
TOWER_WIDTH = 32  # the FocalNet's first-stage width (then 64, 128)
TOKEN_PIXELS = 16  # the vision tower's 4 px patches, merged twice
# The caption stage's instructions (caption.prompt dense / short).
INSTRUCTIONS = (
    "Describe this image and its style in a very detailed manner.",
    "Describe this image in one sentence.",
)


def _corpus(n: int, seed: int) -> list[str]:
    """Captions, prompts and template words to train the tokenizer on."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        _, truth = draw_image(rng)
        texts.append(describe(truth, rng))
    return texts + list(INSTRUCTIONS) * 50 + ["USER: ASSISTANT:"] * 50


def build_tokenizer(seed: int) -> Any:
    """A Llama-style (SentencePiece-like, "▁" word starts) BPE tokenizer for the demo's words.

    Trained on descriptive captions so every word of the demo's vocabulary is one token; any
    other printable ASCII still tokenizes character by character.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from recaption.demo.tiny_models import LLAVA_15_CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=[*string.printable.strip(), "▁", "\n"],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(3000, seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(
    tokenizer: Any,
    drop_path_rate: float = 0.0,
    tower: str = "focalnet",
    image_size: int = IMAGE_SIZE,
    tower_width: int = TOWER_WIDTH,
) -> tuple[Any, Any]:
    """A random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` for ``tokenizer``.

    The vision tower (``tower``) is a tiny FocalNet (``FocalNetModel``: an overlapping 7x7
    convolution of stride 4, focal modulation with depthwise convolutions, two patch
    mergings, so ``image_size`` 128 px images become 8x8 = 64 tokens) or a tiny Swin
    transformer (4 px patches, shifted 6x6 windows, the same token grid), its first stage
    ``tower_width`` wide (doubled at each merging), fed to the Llama through LLaVA's
    two-layer projector with the ``full`` feature strategy (no CLS token to drop). Both give
    their hidden states as token sequences, as LLaVA's projector reads them. A CLIP ViT learns
    shapes far too slowly from random weights on a CPU (real LLaVA starts from a pretrained
    one): after 50k images a tiny ViT still named the main shape at chance. The convolutional
    FocalNet learns them faster than the Swin: held-out main-shape accuracy after 1,000
    vision-pretraining steps of 32, 48% against 40%, at the same cost a step.
    ``drop_path_rate`` is the tower's stochastic depth (none: a tower this small underfits).

    The processor pads every image to a square and resizes it to ``image_size``: the demo's
    images are 96 px on their short side, so at 96 a 16:9 image keeps 54 px of height and its
    small shapes a few pixels. At 128 px the tower learns shapes faster per step: held-out
    main shape of the tower alone after 4,000 pretraining steps 88% against 82% at 96 px (a
    tower 48 wide at 96 px: 86%; 48 wide at 128 px, 88%, for 40% more time a step). The
    shipped captioner is 128 px and 32 wide, its tower pretrained 6,000 steps on images drawn
    fresh every step: 92% (5,000 steps sampled from a bank of 24,000 images: 87.5%, and the
    last layer's per-token shapes 69% against 80%: the bank was memorised).
    """
    from transformers import (
        FocalNetConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
        SwinConfig,
    )

    from recaption.demo.tiny_models import (
        _CLIP_IMAGE_MEAN,
        _CLIP_IMAGE_STD,
        LLAVA_15_CHAT_TEMPLATE,
    )

    if image_size % TOKEN_PIXELS:
        raise ValueError(f"image_size {image_size} is not a multiple of {TOKEN_PIXELS} px")
    # 4 px patches, 3 stages of 2 blocks at widths w, 2w, 4w: 128 px -> 8x8 tokens of 4w.
    common = {
        "image_size": image_size,
        "patch_size": 4,
        "embed_dim": tower_width,
        "depths": [2, 2, 2],
        "mlp_ratio": 2.0,
        "drop_path_rate": drop_path_rate,
    }
    if tower == "focalnet":
        vision = FocalNetConfig(
            focal_levels=[2, 2, 2],
            focal_windows=[3, 3, 3],
            use_conv_embed=True,  # an overlapping 7x7 convolution, stride 4
            **common,
        )
        # LLaVA's projector reads the tower's width from ``hidden_size``, which Swin has
        # and FocalNet does not: the last stage's width (saved in config.json with it).
        vision.hidden_size = vision.embed_dim * 2 ** (len(vision.depths) - 1)
    elif tower == "swin":
        vision = SwinConfig(num_heads=[2, 4, 8], window_size=6, **common)
    else:
        raise ValueError(f"unknown vision tower {tower!r}: focalnet or swin")
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(image_size // TOKEN_PIXELS) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = LlavaImageProcessorPil(
        do_pad=True,  # LLaVA-1.5's "pad" aspect mode: the whole image, on the mean colour
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(_CLIP_IMAGE_MEAN),
        image_std=list(_CLIP_IMAGE_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        patch_size=TOKEN_PIXELS,  # one image token per 16x16 px after the two mergings
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    )
    return model, processor


def as_downloaded(image: Any, rng: random.Random, image_size: int = DOWNLOAD_SIZE) -> Any:
    """``image`` as the demo's download leaves it: JPEG, smallest side resized to 96 px."""
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=rng.randint(80, 95))
    out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    w, h = out.size
    scale = image_size / min(w, h)
    if scale < 1:
        out = out.resize((round(w * scale), round(h * scale)), Image.Resampling.BOX)
    return out


def _batch(
    processor: Any, seeds: list[int], instructions: list[str] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Model inputs (with ``labels`` on the answers) for the world images drawn from ``seeds``."""
    import torch

    from recaption.models.llava import chat_prompt

    tok = processor.tokenizer
    images, captions, truths = [], [], []
    for seed in seeds:
        rng = random.Random(seed)
        image, truth = draw_image(rng)
        images.append(as_downloaded(image, rng))
        captions.append(describe(truth, rng))
        truths.append(truth)
    instruction = (instructions or [INSTRUCTIONS[seeds[0] % len(INSTRUCTIONS)]])[0]
    prompt = chat_prompt(processor, instruction)
    inputs = processor(text=[prompt] * len(seeds), images=images, return_tensors="pt")
    answers = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in captions]
    width = max(len(a) for a in answers)
    answer_ids = torch.full((len(seeds), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seeds), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seeds), width), dtype=torch.long)
    for i, ids in enumerate(answers):
        answer_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    prompt_labels = torch.full_like(inputs["input_ids"], -100)
    batch = {
        "input_ids": torch.cat([inputs["input_ids"], answer_ids], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], mask], dim=1),
        "pixel_values": inputs["pixel_values"],
        "labels": torch.cat([prompt_labels, labels], dim=1),
    }
    return batch, [{"caption": c, "truth": t} for c, t in zip(captions, truths, strict=True)]


# What the auxiliary heads read off the image features: attribute -> its classes.
AUX_TARGETS: dict[str, tuple[str, ...]] = {
    "main_shape": tuple(SHAPES),
    "main_colour": tuple(sorted(COLOURS)),
    "main_size": ("small", "medium", "large"),
    "main_position": tuple(sorted(POSITIONS)),
    "background": ("plain", "gradient", "texture"),
    "background_colour_1": tuple(sorted(COLOURS)),
    "background_colour_2": ("none", *sorted(COLOURS)),
    "count": ("1", "2", "3"),
}


# Shape is what a vision tower from random weights learns last: its head weighs more.
AUX_WEIGHTS = {"main_shape": 4.0}


def dense_layers(image_size: int) -> dict[int, int]:
    """The vision-tower layers with dense targets, hidden-state index -> tokens a side, for
    the processor's ``image_size``: the last layer (16x16 px a token) and the first stage's
    output (8x8 px). For each of their tokens the target is what its pixels show: the shape
    and the colour of the object there (or "none": background or padding) and which object it
    is (none, main, other)."""
    return {-1: image_size // TOKEN_PIXELS, 1: 2 * image_size // TOKEN_PIXELS}


def processor_layers(processor: Any) -> dict[int, int]:
    """:func:`dense_layers` for the square ``processor`` resizes images to."""
    return dense_layers(processor.image_processor.crop_size["height"])


DENSE_SHAPES = ("none", *SHAPES)
DENSE_COLOURS = ("none", *sorted(COLOURS))
DENSE_PARTS = ("none", "main", "other")
DENSE_CLASSES = len(DENSE_SHAPES) + len(DENSE_COLOURS) + len(DENSE_PARTS)


def token_targets(truth: dict[str, Any], grid: int) -> Any:
    """Soft dense targets of one image for a ``grid`` x ``grid`` token layer.

    The image's object map (:func:`recaption.demo.world.object_map`) padded to a square as
    the processor pads the image (centred), cut into ``grid`` x ``grid`` cells; each cell's
    target is the share of its pixels of each shape, colour and part class
    (:data:`DENSE_SHAPES`, :data:`DENSE_COLOURS`, :data:`DENSE_PARTS`, concatenated). Shape
    ``(grid * grid, DENSE_CLASSES)``, float32, each of the three groups summing to 1.
    """
    return _cell_targets(truth, _square_object_map(truth), grid)


def _square_object_map(truth: dict[str, Any]) -> Any:
    """:func:`recaption.demo.world.object_map` padded to a square with 0, centred."""
    import numpy as np

    labels = object_map(truth)
    h, w = labels.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = labels
    return square


def _cell_targets(truth: dict[str, Any], square: Any, grid: int) -> Any:
    """:func:`token_targets` from the image's square object map ``square``."""
    import numpy as np
    import torch
    from PIL import Image

    cell = 8
    small = np.asarray(
        Image.fromarray(square).resize((grid * cell, grid * cell), Image.Resampling.NEAREST)
    )
    cells = small.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    n_objects = len(truth["objects"])
    share = np.stack([(cells == k).mean(1) for k in range(n_objects + 1)], 1)  # cells x objs
    lookup = np.zeros((n_objects + 1, DENSE_CLASSES), dtype=np.float32)
    lookup[0, [0, len(DENSE_SHAPES), len(DENSE_SHAPES) + len(DENSE_COLOURS)]] = 1
    for k, obj in enumerate(truth["objects"], start=1):
        lookup[k, DENSE_SHAPES.index(obj["shape"])] = 1
        lookup[k, len(DENSE_SHAPES) + DENSE_COLOURS.index(obj["colour"])] = 1
        lookup[k, len(DENSE_SHAPES) + len(DENSE_COLOURS) + (1 if k == 1 else 2)] = 1
    return torch.from_numpy(share.astype(np.float32) @ lookup)


def aux_labels(truths: list[dict[str, Any]], layers: dict[int, int]) -> dict[str, Any]:
    """Class indices of :data:`AUX_TARGETS` for a batch of ground truths, and under
    ``tokens_<layer>`` the dense targets (:func:`token_targets`) of ``layers``
    (:func:`dense_layers`)."""
    import torch

    from recaption.demo.describe import background_colours

    labels: dict[str, list[int]] = {name: [] for name in AUX_TARGETS}
    for truth in truths:
        main = truth["objects"][0]
        colours = [*background_colours(truth), "none"]
        values = {
            "main_shape": main["shape"],
            "main_colour": main["colour"],
            "main_size": main["size"],
            "main_position": main["position"],
            "background": truth["background"],
            "background_colour_1": colours[0],
            "background_colour_2": colours[1],
            "count": str(len(truth["objects"])),
        }
        for name, value in values.items():
            labels[name].append(AUX_TARGETS[name].index(value))
    result = {name: torch.tensor(v) for name, v in labels.items()}
    squares = [_square_object_map(t) for t in truths]  # drawn once for every layer
    for layer, grid in layers.items():
        result[f"tokens_{layer}"] = torch.stack(
            [_cell_targets(t, sq, grid) for t, sq in zip(truths, squares, strict=True)]
        )
    return result


class AuxHeads:
    """Linear classifiers of the ground truth on the image features the projector receives.

    A training aid only (not saved): it gives the vision tower, trained from random weights
    here where LLaVA starts from a pretrained CLIP, a direct signal about shapes and colours,
    which the caption loss alone passes back slowly. The pooled heads classify the image
    (:data:`AUX_TARGETS`); the dense ones, weighted by ``dense_weight``, every token of
    :func:`dense_layers` (:func:`token_targets`: what its pixels show, so every object, not
    only the main one, is named to the tower).
    """

    def __init__(self, model: Any, dense_weight: float = 1.0) -> None:
        import torch

        self.dense_weight = dense_weight
        self.layer = model.config.vision_feature_layer
        vision = model.config.vision_config
        width = vision.hidden_size
        self.layers = dense_layers(vision.image_size)
        n_tokens = model.config.image_seq_length
        self.hidden_states: Any = None
        # The position head reads every token; the others a mean and max pool (the same
        # wherever the object is).
        self.heads = torch.nn.ModuleDict(
            {
                name: torch.nn.Linear(
                    n_tokens * width if name == "main_position" else 2 * width, len(classes)
                )
                for name, classes in AUX_TARGETS.items()
            }
        )
        # One linear classifier per dense layer, on each token. Hidden state i > 0 is stage
        # i's output, after its patch merging (which every stage but the last ends with).
        stages = len(vision.depths)
        widths = [vision.embed_dim * 2 ** min(i, stages - 1) for i in range(stages + 1)]
        self.dense = torch.nn.ModuleDict(
            {
                f"tokens_{layer}": torch.nn.Linear(widths[layer], DENSE_CLASSES)
                for layer in self.layers
            }
        )
        model.model.vision_tower.register_forward_hook(self._keep)

    def parameters(self) -> list[Any]:
        """Every head's parameters."""
        return [*self.heads.parameters(), *self.dense.parameters()]

    def to(self, device: Any) -> AuxHeads:
        """Move every head to ``device`` (the model's)."""
        self.heads.to(device)
        self.dense.to(device)
        return self

    def _keep(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        if output.hidden_states is not None:
            self.hidden_states = output.hidden_states

    @property
    def features(self) -> Any:
        """The last forward pass's hidden states of the layer LLaVA reads."""
        return self.hidden_states[self.layer]

    def logits(self, hidden: Any) -> dict[str, Any]:
        """Each head's logits for the vision tower's hidden states ``hidden``."""
        import torch

        pooled = torch.cat([hidden.mean(1), hidden.amax(1)], dim=-1)
        return {
            name: head(hidden.flatten(1) if name == "main_position" else pooled)
            for name, head in self.heads.items()
        }

    def dense_loss(self, labels: dict[str, Any], hidden_states: Any = None) -> Any:
        """Soft cross-entropy of the dense heads, summed over the shape, colour and part groups
        and averaged over tokens (on ``hidden_states``, else the last forward pass's)."""
        states = self.hidden_states if hidden_states is None else hidden_states
        total: Any = 0.0
        for layer in self.layers:
            name = f"tokens_{layer}"
            logits = self.dense[name](states[layer].float())
            target = labels[name].to(logits.dtype)
            start = 0
            for size in (len(DENSE_SHAPES), len(DENSE_COLOURS), len(DENSE_PARTS)):
                group = slice(start, start + size)
                log_p = logits[..., group].log_softmax(-1)
                total = total - (target[..., group] * log_p).sum(-1).mean()
                start += size
        return total

    def loss(self, labels: dict[str, Any], hidden: Any = None, hidden_states: Any = None) -> Any:
        """Summed cross-entropy of every head (on ``hidden`` / ``hidden_states``, else the last
        forward pass's), the dense heads' times ``dense_weight`` (0: the pooled heads only)."""
        import torch.nn.functional as F  # noqa: N812

        logits = self.logits(self.features if hidden is None else hidden)
        pooled = sum(
            AUX_WEIGHTS.get(n, 1.0) * F.cross_entropy(logits[n], labels[n]) for n in self.heads
        )
        if not self.dense_weight:
            return pooled
        return pooled + self.dense_weight * self.dense_loss(labels, hidden_states)


VISION_SEED_BASE = 2_000_000
VISION_HELD_OUT_SEED = 1_900_000  # 512 images below VISION_SEED_BASE's, above the captions'


def image_bank(processor: Any, n: int, seed_base: int) -> tuple[Any, dict[str, Any]]:
    """``n`` world images as the processor's pixel values (float16) and their aux labels."""
    import torch

    pixels, truths = [], []
    for i in range(n):
        rng = random.Random(seed_base + i)
        image, truth = draw_image(rng)
        pixels.append(as_downloaded(image, rng))
        truths.append(truth)
    values = [  # float16 chunk by chunk: a 24k bank is 2.4 GB, not 4.7 GB in float32 first
        processor.image_processor(pixels[i : i + 256], return_tensors="pt")["pixel_values"].to(
            torch.float16
        )
        for i in range(0, n, 256)
    ]
    layers = processor_layers(processor)
    labels = aux_labels(truths, layers)
    for layer in layers:
        labels[f"tokens_{layer}"] = labels[f"tokens_{layer}"].to(torch.float16)
    return torch.cat(values), labels


def fresh_batch(processor: Any, seeds: list[int]) -> tuple[Any, dict[str, Any]]:
    """World images drawn from ``seeds`` as the processor's pixel values and their aux labels."""
    images, truths = [], []
    for seed in seeds:
        rng = random.Random(seed)
        image, truth = draw_image(rng)
        images.append(as_downloaded(image, rng))
        truths.append(truth)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, aux_labels(truths, processor_layers(processor))


def _to(tensors: dict[str, Any], device: Any) -> dict[str, Any]:
    return {name: value.to(device, non_blocking=True) for name, value in tensors.items()}


class StepBatches:
    """Step ``i``'s batch, drawn from seeds ``seed_base + i * batch_size`` onwards, as a
    map-style dataset: a ``DataLoader`` with workers draws the next steps' images while the
    model trains on this one, and yields them in step order, so the batches, and the weights
    trained on them, are the same with any number of workers.

    ``kind`` is ``"caption"`` (:func:`_batch`'s model inputs and the aux labels of its images)
    or ``"vision"`` (:func:`fresh_batch`'s pixel values and aux labels).
    """

    def __init__(
        self, processor: Any, kind: str, seed_base: int, batch_size: int, steps: int
    ) -> None:
        self.processor, self.kind = processor, kind
        self.seed_base, self.batch_size, self.steps = seed_base, batch_size, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[Any, dict[str, Any]]:
        base = self.seed_base + step * self.batch_size
        seeds = list(range(base, base + self.batch_size))
        if self.kind == "vision":
            return fresh_batch(self.processor, seeds)
        batch, drawn = _batch(self.processor, seeds)
        return batch, aux_labels([d["truth"] for d in drawn], processor_layers(self.processor))


def step_loader(dataset: StepBatches, workers: int) -> Any:
    """The batches of ``dataset`` in step order, drawn by ``workers`` processes (0: inline)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=None,  # each item is already a batch
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )


def vision_accuracy(aux: AuxHeads, hidden_states: Any, labels: dict[str, Any]) -> dict[str, float]:
    """Held-out accuracy of the aux heads on a tower's ``hidden_states``: main shape (also per
    main-object size), main colour, first background colour and main position, and the dense
    heads' shape on the tokens mostly covered by an object (``token_shape_<layer>``)."""
    logits = aux.logits(hidden_states[aux.layer])
    right = {name: logits[name].argmax(-1) == labels[name] for name in logits}
    result = {
        name: round(float(right[name].float().mean()), 4)
        for name in ("main_shape", "main_colour", "background_colour_1", "main_position")
    }
    for i, size in enumerate(AUX_TARGETS["main_size"]):
        of_size = labels["main_size"] == i
        if bool(of_size.any()):
            result[f"main_shape_{size}"] = round(
                float(right["main_shape"][of_size].float().mean()), 4
            )
    n_shapes = len(DENSE_SHAPES)
    for layer in aux.layers:
        target = labels[f"tokens_{layer}"].float()[..., :n_shapes]
        on_object = target[..., 0] < 0.5
        guess = aux.dense[f"tokens_{layer}"](hidden_states[layer].float())[..., 1:n_shapes]
        hits = guess.argmax(-1) == target[..., 1:].argmax(-1)
        result[f"token_shape_{layer}"] = round(float(hits[on_object].float().mean()), 4)
    return result


def pretrain_vision_tower(
    model: Any,
    processor: Any,
    aux: AuxHeads,
    *,
    steps: int,
    bank_size: int = 0,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    eval_every: int = 0,
    device: str = "cpu",
    workers: int = 0,
) -> dict[str, float]:
    """Train the vision tower alone on :class:`AuxHeads`' classification of the ground truth.

    LLaVA starts from a pretrained CLIP vision tower; this is the demo's stand-in for that
    pretraining: ``batch_size`` world images a step, drawn fresh every step (seed
    ``VISION_SEED_BASE + step * batch_size + i``) or, with ``bank_size``, sampled from a bank
    of that many drawn once, classified by main shape, colour, size, position, background and
    count (and, with the heads' ``dense_weight``, token by token). Returns the held-out
    accuracy (:func:`vision_accuracy`) on 512 images drawn from ``VISION_HELD_OUT_SEED``,
    which no training step draws. It trains on ``device`` (the model's); fresh images are drawn
    by ``workers`` processes (:func:`step_loader`) while it trains.
    """
    import torch

    started = time.monotonic()
    bank, labels = (None, None)
    if bank_size:
        bank, labels = image_bank(processor, bank_size, VISION_SEED_BASE)
    held_out, held_labels = image_bank(processor, 512, VISION_HELD_OUT_SEED)
    held_out, held_labels = held_out.to(device), _to(held_labels, device)
    logger.info(
        "vision pretraining: %s, held-out images drawn (%.0f s)",
        f"a bank of {bank_size} images" if bank_size else "fresh images every step",
        time.monotonic() - started,
    )
    tower = model.model.vision_tower
    params = [*tower.parameters(), *aux.parameters()]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, learning_rate, total_steps=steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(0)
    fresh = None
    if bank is None:
        dataset = StepBatches(processor, "vision", VISION_SEED_BASE, batch_size, steps)
        fresh = iter(step_loader(dataset, workers))

    def hidden(pixel_values: Any) -> Any:
        return tower(pixel_values.float(), output_hidden_states=True).hidden_states

    def held_out_accuracy() -> dict[str, float]:
        tower.eval()
        with torch.inference_mode():
            result = vision_accuracy(aux, hidden(held_out), held_labels)
        tower.train()
        return result

    tower.train()
    for step in range(steps):
        if fresh is not None:
            pixels, step_labels = next(fresh)
        else:
            idx = torch.randint(0, bank_size, (batch_size,), generator=gen)
            pixels, step_labels = bank[idx], {name: value[idx] for name, value in labels.items()}
        states = hidden(pixels.to(device))
        step_labels = _to(step_labels, device)
        loss = aux.loss(step_labels, states[aux.layer], states)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info(
                "vision step %d/%d aux loss %.4f (%.0f s)",
                step,
                steps,
                float(loss.detach()),
                time.monotonic() - started,
            )
        if eval_every and step and step % eval_every == 0:
            logger.info("vision step %d held-out: %s", step, held_out_accuracy())
    result = held_out_accuracy()
    logger.info("vision tower on held-out images: %s", result)
    return result


def caption_images(
    model: Any, processor: Any, images: list[Any], max_new_tokens: int = 64
) -> list[str]:
    """Greedy captions of ``images`` with the dense instruction, as the caption stage asks."""
    import torch

    from recaption.models.llava import chat_prompt

    prompt = chat_prompt(processor, INSTRUCTIONS[0])
    inputs = processor(
        text=[prompt] * len(images), images=images, return_tensors="pt", padding=True
    ).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def quick_accuracy(
    model: Any, processor: Any, n: int = 64, seed: int = EVAL_SEED
) -> dict[str, float | None]:
    """Caption accuracy (:mod:`recaption.caption_accuracy`) on ``n`` images never trained on.

    The main object's colour and shape together, the background colour(s), the share of
    captions that name a false colour or shape, and that share among the images with one, two
    and three objects (``hallucination_<n>_objects``: a secondary object's shape is the hard
    part).
    """
    from recaption.caption_accuracy import accuracy_table

    rng = random.Random(seed)
    drawn = [draw_image(rng) for _ in range(n)]
    images = [as_downloaded(image, rng) for image, _ in drawn]
    captions: list[str] = []
    for start in range(0, n, 16):
        captions += caption_images(model, processor, images[start : start + 16])
    logger.info("example caption: %s", captions[0])
    rows = list(zip(captions, [truth for _, truth in drawn], strict=True))
    table = accuracy_table(rows)
    attributes = table["attributes"]
    result: dict[str, float | None] = {
        "n": n,
        "main_shape": attributes["main_shape"]["right"],
        "main_colour": attributes["main_colour"]["right"],
        "main_shape_colour": attributes["main_shape_colour"]["right"],
        "background_colour": attributes["background_colour"]["right"],
        "hallucination": table["false_statements"]["hallucination"],
    }
    for count in sorted({len(truth["objects"]) for _, truth in rows}):
        subset = accuracy_table(r for r in rows if len(r[1]["objects"]) == count)
        result[f"hallucination_{count}_objects"] = subset["false_statements"]["hallucination"]
    return result


def train_llava(
    out: Path,
    *,
    seed: int = 0,
    steps: int = 2400,
    batch_size: int = 32,
    learning_rate: float = 1.5e-3,
    warmup_steps: int = 150,
    threads: int = 1,
    eval_every: int = 0,
    aux_weight: float = 0.5,
    vision_steps: int = 6000,
    vision_bank_size: int = 0,
    vision_batch_size: int = 32,
    vision_learning_rate: float = 2e-3,
    eval_images: int = 256,
    vision_lr_scale: float = 0.2,
    drop_path_rate: float = 0.0,
    dense_weight: float = 1.0,
    vision_tower: str = "focalnet",
    image_size: int = IMAGE_SIZE,
    tower_width: int = TOWER_WIDTH,
    device: str = "cpu",
    workers: int = 1,
) -> dict[str, Any]:
    """Train the demo captioner from random weights and ``save_pretrained`` it into ``out``.

    First the vision tower alone (:func:`pretrain_vision_tower`, ``vision_steps`` steps of
    ``vision_batch_size`` images, from a bank of ``vision_bank_size`` or, with 0, drawn fresh
    every step). Then every step draws ``batch_size`` fresh world images (seed
    ``TRAIN_SEED_BASE + step * batch_size + i``); AdamW with a linear warm-up and a cosine
    decay to a tenth, the vision tower at ``vision_lr_scale`` times the learning rate. The loss
    is the caption's plus ``aux_weight`` times :class:`AuxHeads`' (discarded after training).
    ``drop_path_rate`` is the vision tower's stochastic depth; ``vision_tower`` its kind,
    ``image_size`` the processor's square and ``tower_width`` the tower's first-stage width
    (:func:`build_model`). Training runs on ``device`` (``"cuda"`` on a GPU node) with
    ``threads`` CPU threads, while ``workers`` processes draw the next steps' images
    (:func:`step_loader`; the batches are the same with any number, 0 draws them inline).
    Returns what is also written to ``out/recaption_demo.json``: seeds, steps, world version,
    the loss curve's tail and the quick accuracy on unseen images (also every ``eval_every`` steps).
    """
    import torch
    from transformers import GenerationConfig

    total_started = time.monotonic()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    tokenizer = build_tokenizer(seed)
    model, processor = build_model(tokenizer, drop_path_rate, vision_tower, image_size, tower_width)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "demo captioner: %.2fM parameters, %d steps of %d", n_params / 1e6, steps, batch_size
    )
    aux = AuxHeads(model, dense_weight).to(device)
    vision = {}
    if vision_steps:
        vision = pretrain_vision_tower(
            model,
            processor,
            aux,
            steps=vision_steps,
            bank_size=vision_bank_size,
            batch_size=vision_batch_size,
            learning_rate=vision_learning_rate,
            eval_every=500,
            device=device,
            workers=workers,
        )
    tower_params = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower_params}
    other_params = [p for p in model.parameters() if id(p) not in tower_ids]
    params = [*tower_params, *other_params, *aux.parameters()]
    opt = torch.optim.AdamW(
        [
            {"params": tower_params, "lr": learning_rate * vision_lr_scale},
            {"params": [*other_params, *aux.parameters()]},
        ],
        lr=learning_rate,
        weight_decay=0.01,
    )

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    started = time.monotonic()
    losses: list[float] = []
    aux_losses: list[float] = []
    batches = step_loader(
        StepBatches(processor, "caption", TRAIN_SEED_BASE, batch_size, steps), workers
    )
    for step, (batch, labels) in enumerate(batches):
        caption_loss = model(**_to(batch, device)).loss
        aux_loss = aux.loss(_to(labels, device))
        loss = caption_loss + aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(caption_loss))
        aux_losses.append(float(aux_loss))
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d caption loss %.4f aux loss %.4f (%.0f s)",
                step,
                steps,
                sum(losses[-50:]) / len(losses[-50:]),
                sum(aux_losses[-50:]) / len(aux_losses[-50:]),
                time.monotonic() - started,
            )
        if eval_every and step and step % eval_every == 0:
            model.eval()
            logger.info("step %d quick accuracy: %s", step, quick_accuracy(model, processor, 32))
            model.train()
    model.eval()
    accuracy = quick_accuracy(model, processor, eval_images)
    logger.info("quick accuracy on unseen images: %s", accuracy)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    record = {
        "model": "LlavaForConditionalGeneration (demo captioner)",
        "parameters": n_params,
        "world_version": WORLD_VERSION,
        "seed": seed,
        "train_image_seeds": [TRAIN_SEED_BASE, TRAIN_SEED_BASE + steps * batch_size - 1],
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "aux_weight": aux_weight,
        "dense_weight": dense_weight,
        "vision_lr_scale": vision_lr_scale,
        "vision_pretraining": {
            "tower": vision_tower,
            "image_size": image_size,
            "tower_width": tower_width,
            "steps": vision_steps,
            "batch_size": vision_batch_size,
            "learning_rate": vision_learning_rate,
            "drop_path_rate": drop_path_rate,
            "image_seeds": [
                VISION_SEED_BASE,
                VISION_SEED_BASE + (vision_bank_size or vision_steps * vision_batch_size) - 1,
            ],
            "fresh_every_step": not vision_bank_size,
            "held_out_seed": VISION_HELD_OUT_SEED,
            "held_out_accuracy": vision,
        },
        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "device": device,
        "wall_time_s": round(time.monotonic() - started, 1),
        "total_wall_time_s": round(time.monotonic() - total_started, 1),
        "quick_accuracy_unseen": accuracy,
        "eval_seed": EVAL_SEED,
        "vocabulary": {"colours": sorted(COLOURS), "shapes": list(SHAPES)},
    }
    (out / "recaption_demo.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
