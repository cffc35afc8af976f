"""Train the demo's captioner: a tiny LLaVA-1.5 that has learned to describe the demo world.

The model is a real ``LlavaForConditionalGeneration`` (a CLIP vision tower on 96 px images
cut into 12 px patches, a 3-layer Llama) with a ``LlavaProcessor`` that pads images to a
square as LLaVA-1.5 does, so no shape at the image's edge is cropped away. It is trained from
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
from recaption.demo.world import COLOURS, POSITIONS, SHAPES, WORLD_VERSION, draw_image

logger = logging.getLogger(__name__)

TRAIN_SEED_BASE = 1_000_000
EVAL_SEED = 7_777
IMAGE_SIZE = 96
PATCH_SIZE = 12
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


def build_model(tokenizer: Any) -> tuple[Any, Any]:
    """A random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` for ``tokenizer``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    from recaption.demo.tiny_models import (
        _CLIP_IMAGE_MEAN,
        _CLIP_IMAGE_STD,
        LLAVA_15_CHAT_TEMPLATE,
    )

    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=128,
    )
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
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=n_patches,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = LlavaImageProcessorPil(
        do_pad=True,  # LLaVA-1.5's "pad" aspect mode: the whole image, on the mean colour
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(_CLIP_IMAGE_MEAN),
        image_std=list(_CLIP_IMAGE_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def as_downloaded(image: Any, rng: random.Random, image_size: int = IMAGE_SIZE) -> Any:
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


def aux_labels(truths: list[dict[str, Any]]) -> dict[str, Any]:
    """Class indices of :data:`AUX_TARGETS` for a batch of ground truths."""
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
    return {name: torch.tensor(v) for name, v in labels.items()}


class AuxHeads:
    """Linear classifiers of the ground truth on the image features the projector receives.

    A training aid only (not saved): it gives the vision tower, trained from random weights
    here where LLaVA starts from a pretrained CLIP, a direct signal about shapes and colours,
    which the caption loss alone passes back slowly.
    """

    def __init__(self, model: Any, n_tokens: int) -> None:
        import torch

        width = model.config.vision_config.hidden_size
        self.features: Any = None
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(n_tokens * width, len(c)) for name, c in AUX_TARGETS.items()}
        )
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self.features = args[0]

    def loss(self, labels: dict[str, Any]) -> Any:
        """Summed cross-entropy of every head on the last forward pass's image features."""
        import torch.nn.functional as F  # noqa: N812

        flat = self.features.flatten(1)
        return sum(F.cross_entropy(head(flat), labels[n]) for n, head in self.heads.items())


def caption_images(
    model: Any, processor: Any, images: list[Any], max_new_tokens: int = 64
) -> list[str]:
    """Greedy captions of ``images`` with the dense instruction, as the caption stage asks."""
    import torch

    from recaption.models.llava import chat_prompt

    prompt = chat_prompt(processor, INSTRUCTIONS[0])
    inputs = processor(
        text=[prompt] * len(images), images=images, return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def quick_accuracy(
    model: Any, processor: Any, n: int = 64, seed: int = EVAL_SEED
) -> dict[str, float]:
    """Main object's colour+shape and the background colour named, on ``n`` unseen images.

    A plain substring check, enough to follow training; the pipeline's own measurement is
    :mod:`recaption.caption_accuracy`.
    """
    from recaption.demo.describe import background_colours

    rng = random.Random(seed)
    drawn = [draw_image(rng) for _ in range(n)]
    images = [as_downloaded(image, rng) for image, _ in drawn]
    captions: list[str] = []
    for start in range(0, n, 16):
        captions += caption_images(model, processor, images[start : start + 16])
    main = shape = bg = 0
    for caption, (_, truth) in zip(captions, drawn, strict=True):
        obj = truth["objects"][0]
        text = caption.lower()
        main += f"{obj['colour']} {obj['shape']}" in text
        shape += obj["shape"] in text
        bg += all(c in text.split("background")[0] + text for c in background_colours(truth))
    logger.info("example caption: %s", captions[0])
    return {"main_colour_shape": main / n, "main_shape": shape / n, "background": bg / n}


def train_llava(
    out: Path,
    *,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 32,
    learning_rate: float = 1.5e-3,
    warmup_steps: int = 150,
    threads: int = 1,
    eval_every: int = 0,
    aux_weight: float = 0.5,
) -> dict[str, Any]:
    """Train the demo captioner from random weights and ``save_pretrained`` it into ``out``.

    Every step draws ``batch_size`` fresh world images (seed ``TRAIN_SEED_BASE + step *
    batch_size + i``); AdamW with a linear warm-up and a cosine decay to a tenth. The loss is
    the caption's plus ``aux_weight`` times :class:`AuxHeads`' (discarded after training).
    Returns what is also written to ``out/recaption_demo.json``: seeds, steps, world version,
    the loss curve's tail and the quick accuracy on unseen images (also every ``eval_every`` steps).
    """
    import torch
    from transformers import GenerationConfig

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    tokenizer = build_tokenizer(seed)
    model, processor = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "demo captioner: %.2fM parameters, %d steps of %d", n_params / 1e6, steps, batch_size
    )
    aux = AuxHeads(model, (IMAGE_SIZE // PATCH_SIZE) ** 2)
    params = [*model.parameters(), *aux.heads.parameters()]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)

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
    for step in range(steps):
        base = TRAIN_SEED_BASE + step * batch_size
        batch, drawn = _batch(processor, list(range(base, base + batch_size)))
        caption_loss = model(**batch).loss
        aux_loss = aux.loss(aux_labels([d["truth"] for d in drawn]))
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
    accuracy = quick_accuracy(model, processor)
    logger.info("quick accuracy on unseen images: %s", accuracy)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
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
        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "wall_time_s": round(time.monotonic() - started, 1),
        "quick_accuracy_unseen": accuracy,
        "eval_seed": EVAL_SEED,
        "vocabulary": {"colours": sorted(COLOURS), "shapes": list(SHAPES)},
    }
    (out / "recaption_demo.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
