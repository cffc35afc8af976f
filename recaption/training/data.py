"""The training stream: each (process, DataLoader worker) reads only the shards it owns.

A *reader* is one DataLoader worker of one process: ``reader = rank * num_workers + worker``
of ``n_readers = world_size * num_workers``. Every epoch the merged shards are shuffled with a
seed (``train.seed``, epoch) and dealt to the readers, webdataset-style: reader ``r`` takes
*units* ``r, r + n_readers, ...``. A unit is a whole shard when there are at least as many
shards as readers; with fewer shards each shard is split into ``parts`` units by sample
(``ceil(n_readers / n_shards)``), so no reader is left without data. Each process therefore
reads about ``1 / world_size`` of the dataset per epoch (plus the headers of a shared shard),
instead of all of it.

Inside a unit the samples come in a seeded permutation of their keys (the tar's member
headers are indexed, then each sample's bytes are read), so the stream is a function of the
samples and the seed, never of the order img2dataset wrote them in. A reader's place in the
stream is ``(epoch, unit, offset)``: a checkpoint records every reader's place, and a resumed
run with the same processes and workers continues exactly there, reading nothing it skips.
With another number of readers the shards are dealt differently, so the resumed stream starts
at the next epoch boundary (after the furthest epoch any reader had reached): no sample is
repeated within that epoch, and the rest of the interrupted epoch is skipped.

Readers run at their own pace through epochs (an endless stream), so shards of unequal size
never leave a process without data: every process takes the same number of optimizer steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from recaption.config import TrainConfig
from recaption.schemas import IMAGE_EXTENSIONS
from recaption.shards import RawSample, iter_samples_in_order

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """Part ``part`` of ``parts`` of one shard: its samples ``part, part + parts, ...``."""

    shard: Path
    part: int = 0
    parts: int = 1


def reader_units(
    shards: list[Path], seed: int, epoch: int, reader: int, n_readers: int
) -> list[Unit]:
    """The units reader ``reader`` of ``n_readers`` reads in ``epoch``, in order."""
    order = sorted(shards)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    parts = max(1, math.ceil(n_readers / max(1, len(order))))
    units = [Unit(shard, part, parts) for shard in order for part in range(parts)]
    return units[reader::n_readers]


def unit_order(seed: int, epoch: int, unit: Unit) -> Any:
    """The reading order of a unit's keys: a seeded permutation, then this part's share."""

    def order(keys: list[str]) -> list[str]:
        keys = list(keys)
        random.Random(f"{seed}-{epoch}-{unit.shard.stem}").shuffle(keys)
        return keys[unit.part :: unit.parts]

    return order


def cache_config(config: TrainConfig) -> dict[str, Any]:
    """What decides the training cache (``recaption encode``): teacher and preprocessing."""
    keys = ("teacher", "teacher_revision", "teacher_variant", "teacher_dtype", "resolution",
            "center_crop", "random_flip", "seed", "cache_dtype")  # fmt: skip
    data: dict[str, Any] = {k: getattr(config, k) for k in keys}
    data["original_captions"] = config.synthetic_caption_ratio < 1
    return {"train": data}  # keys as they are in the config (train.teacher, ...)


def scaled_size(original_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """``(height, width)`` after resizing the short side to ``resolution``."""
    height, width = original_size
    scale = resolution / min(width, height)
    return max(resolution, round(height * scale)), max(resolution, round(width * scale))


def draw_augmentation(
    rng: random.Random, original_size: tuple[int, int], config: TrainConfig
) -> tuple[int, int, bool]:
    """The crop's ``(top, left)`` in the resized image and whether to flip, drawn from
    ``rng`` (the flip first, then the crop: the same draws whether pixels are decoded now or
    latents come from the cache)."""
    flip = config.random_flip and rng.random() < 0.5
    height, width = scaled_size(original_size, config.resolution)
    res = config.resolution
    if config.center_crop:
        return (height - res) // 2, (width - res) // 2, flip
    return rng.randint(0, height - res), rng.randint(0, width - res), flip


def preprocess_image(
    image: Image.Image, resolution: int, top: int, left: int, flip: bool
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """SDXL preprocessing: resize the short side, crop, flip; returns pixels in [-1, 1], the
    original ``(height, width)`` and the crop's ``(top, left)`` (of the flipped image) for the
    time ids."""
    image = image.convert("RGB")
    original_size = (image.height, image.width)
    height, width = scaled_size(original_size, resolution)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - left - resolution
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, original_size, (top, left)


def decode_sample(
    sample: RawSample, shard: str, rng: random.Random, config: TrainConfig
) -> dict[str, Any] | None:
    """Pixels and size conditioning of a merged sample, with its two captions; None (and a
    warning) when it has no image or caption or the image does not decode."""
    image_bytes = next((sample.members[k] for k in IMAGE_EXTENSIONS if k in sample.members), None)
    if image_bytes is None or "txt" not in sample.members:
        logger.warning("shard %s, key %s: no image or no caption; skipped", shard, sample.key)
        return None
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            top, left, flip = draw_augmentation(rng, (image.height, image.width), config)
            pixels, original_size, crop = preprocess_image(
                image, config.resolution, top, left, flip
            )
    except Exception as exc:  # corrupt or truncated image bytes
        logger.warning(
            "shard %s, key %s: image does not decode (%s); skipped", shard, sample.key, exc
        )
        return None
    original = ""
    if "json" in sample.members:
        with contextlib.suppress(ValueError, AttributeError):
            original = str(json.loads(sample.members["json"]).get("original_text") or "").strip()
    return {
        "key": sample.key,
        "pixel_values": pixels,
        "synthetic": sample.members["txt"].decode("utf-8", errors="replace").strip(),
        "original": original,
        "original_size": original_size,
        "crop_top_left": crop,
    }


CACHE_ROWS = ("latents_mean", "latents_std", "prompt_embeds", "pooled_embeds", "time_ids")


def iter_cached_in_order(
    path: Path, order: Any, start: int = 0
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(key, tensors)`` of a cache shard (``recaption encode``) in ``order(sorted keys)``
    from the ``start``-th on; only the rows read are loaded (safetensors slices)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = json.loads((f.metadata() or {}).get("keys", "[]"))
        row_of = {key: i for i, key in enumerate(keys)}
        names = set(f.keys())
        shared = {
            name: f.get_tensor(name)[0]
            for name in ("empty_prompt_embeds", "empty_pooled_embeds")
            if name in names
        }
        per_row = [n for n in (*CACHE_ROWS, "prompt_embeds_original", "pooled_embeds_original")
                   if n in names]  # fmt: skip
        for key in order(sorted(keys))[start:]:
            i = row_of[key]
            tensors = {name: f.get_slice(name)[i : i + 1][0] for name in per_row}
            yield key, {**tensors, **shared}


def cached_sample(
    key: str, tensors: dict[str, torch.Tensor], rng: random.Random, config: TrainConfig
) -> dict[str, Any]:
    """A training sample from the cache, drawing from ``rng`` what decoding would draw: the
    augmentation (kept from encoding: the draw is consumed, not used) and the caption."""
    time_ids = tensors["time_ids"]
    draw_augmentation(rng, (int(time_ids[0]), int(time_ids[1])), config)
    choice = choose_caption(rng, config)  # encode stored original_prompt() for "original"
    suffix = {"synthetic": "", "original": "_original"}.get(choice)
    if suffix is None:
        prompt, pooled = tensors["empty_prompt_embeds"], tensors["empty_pooled_embeds"]
    elif f"prompt_embeds{suffix}" in tensors:
        prompt, pooled = tensors[f"prompt_embeds{suffix}"], tensors[f"pooled_embeds{suffix}"]
    else:  # encoded for synthetic captions only
        prompt, pooled = tensors["prompt_embeds"], tensors["pooled_embeds"]
    return {
        "key": key,
        "latents_mean": tensors["latents_mean"],
        "latents_std": tensors["latents_std"],
        "prompt_embeds": prompt,
        "pooled_embeds": pooled,
        "time_ids": time_ids,
    }


def choose_caption(rng: random.Random, config: TrainConfig) -> str:
    """Which caption a sample is trained on this time: ``synthetic``, ``original`` (the
    alt-text, ``1 - synthetic_caption_ratio`` of the time; see :func:`original_prompt`) or
    ``empty`` (``empty_prompt_ratio``, for classifier-free guidance)."""
    use_synthetic = rng.random() < config.synthetic_caption_ratio
    choice = "synthetic" if use_synthetic else "original"
    return "empty" if rng.random() < config.empty_prompt_ratio else choice


def original_prompt(original: str, synthetic: str, config: TrainConfig) -> str:
    """The text an ``original`` draw trains on: the alt-text. A sample without one trains on
    its synthetic caption in a mix (``0 < synthetic_caption_ratio``); at ratio 0, the alt-text
    baseline, it stays empty, so that arm never sees a synthetic caption."""
    if original or config.synthetic_caption_ratio == 0:
        return original
    return synthetic


class TrainingSamples(torch.utils.data.IterableDataset):
    """This process's readers' share of the endless, deterministic sample stream.

    ``start`` maps a reader id to the ``(epoch, unit, offset)`` of its next sample (a resumed
    run); readers not in it start at ``start_epoch``. Each yielded sample carries its
    ``position``: ``(reader, epoch, unit, offset after it)``. A sample whose image does not
    decode is skipped and counted (``skipped`` of the next sample); a shard that cannot be
    read is reported once per reader (``shard_errors``) and the samples it held before the
    damage are used.
    """

    def __init__(
        self,
        shards: list[Path],
        config: TrainConfig,
        *,
        rank: int,
        world_size: int,
        start: dict[int, tuple[int, int, int]] | None = None,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.shards = sorted(shards)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, config.num_workers)
        self.start = dict(start or {})
        self.start_epoch = start_epoch

    @property
    def n_readers(self) -> int:
        return self.world_size * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        yield from self.reader_stream(self.rank * self.workers + worker)

    def reader_stream(self, reader: int) -> Iterator[dict[str, Any]]:
        """The samples of one reader, from its start position on, forever."""
        seed = self.config.seed
        epoch, first_unit, offset = self.start.get(reader, (self.start_epoch, 0, 0))
        skipped, shard_errors = 0, []
        while True:
            n_yielded = n_seen = 0
            whole_epoch = first_unit == 0 and offset == 0
            units = reader_units(self.shards, seed, epoch, reader, self.n_readers)
            for index in range(first_unit, len(units)):
                unit = units[index]
                order = unit_order(seed, epoch, unit)
                cached = unit.shard.suffix == ".safetensors"
                read = iter_cached_in_order if cached else iter_samples_in_order
                samples = read(unit.shard, order, offset)
                done = offset
                try:
                    for sample in samples:
                        done += 1
                        n_seen += 1
                        decoded = (
                            self.from_cache(unit.shard.stem, *sample, epoch)
                            if cached
                            else self.decode(unit.shard.stem, sample, epoch)
                        )
                        if decoded is None:
                            skipped += 1
                            continue
                        decoded.update(
                            position=(reader, epoch, index, done),
                            skipped=skipped,
                            shard_errors=shard_errors,
                        )
                        skipped, shard_errors = 0, []
                        n_yielded += 1
                        yield decoded
                except Exception as exc:  # a truncated tar: the samples before the cut were used
                    message = f"{unit.shard.stem}: {type(exc).__name__}: {exc}"
                    logger.error("shard %s is unreadable: %s", unit.shard.stem, exc)
                    shard_errors.append(message)
                offset = 0
            if n_yielded == 0 and n_seen == 0 and whole_epoch:
                raise RuntimeError(
                    f"reader {reader} (process {self.rank}) found no readable sample in epoch "
                    f"{epoch} of {len(self.shards)} shard(s): "
                    + ", ".join(str(p) for p in self.shards[:5])
                )
            if n_yielded == 0 and whole_epoch:
                raise RuntimeError(
                    f"reader {reader} (process {self.rank}) got no decodable sample in a whole "
                    f"epoch of {n_seen} samples: the images do not decode"
                )
            epoch, first_unit = epoch + 1, 0

    def from_cache(
        self, shard: str, key: str, tensors: dict[str, torch.Tensor], epoch: int
    ) -> dict[str, Any]:
        """A cached sample (latents and embeddings instead of pixels and a caption)."""
        rng = random.Random(f"{self.config.seed}-{epoch}-{shard}-{key}")
        return cached_sample(key, tensors, rng, self.config)

    def decode(self, shard: str, sample: RawSample, epoch: int) -> dict[str, Any] | None:
        """Pixels, the caption the sample is trained on, and SDXL's size conditioning."""
        rng = random.Random(f"{self.config.seed}-{epoch}-{shard}-{sample.key}")
        decoded = decode_sample(sample, shard, rng, self.config)
        if decoded is None:
            return None
        choice = choose_caption(rng, self.config)
        if choice == "original":
            decoded["caption"] = original_prompt(
                decoded["original"], decoded["synthetic"], self.config
            )
        else:
            decoded["caption"] = "" if choice == "empty" else decoded[choice]
        return decoded


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels (or cached latents and embeddings); keep captions, keys and SDXL size
    conditioning as lists; the furthest position of each reader in the batch."""
    positions: dict[int, tuple[int, int, int]] = {}
    for s in samples:
        reader, *place = s["position"]
        positions[reader] = max(positions.get(reader, (0, 0, 0)), tuple(place))
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "positions": positions,
        "skipped": sum(s["skipped"] for s in samples),
        "shard_errors": [e for s in samples for e in s["shard_errors"]],
    }
    if "latents_mean" in samples[0]:
        for name in CACHE_ROWS:
            batch[name] = torch.stack([s[name] for s in samples])
        batch["prompt_embeds"] = torch.stack([s["prompt_embeds"] for s in samples])
        batch["pooled_embeds"] = torch.stack([s["pooled_embeds"] for s in samples])
        batch["captions"] = None  # their length was measured when they were encoded
        return batch
    batch.update(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        captions=[s["caption"] for s in samples],
        original_sizes=[s["original_size"] for s in samples],
        crops_top_left=[s["crop_top_left"] for s in samples],
    )
    return batch


def start_positions(
    start: dict[int, tuple[int, int, int]], start_epoch: int, n_readers: int
) -> dict[str, list[int]]:
    """Every reader's first place, as a checkpoint records it (JSON keys are strings)."""
    return {str(r): list(start.get(r, (start_epoch, 0, 0))) for r in range(n_readers)}


def resume_positions(
    saved: dict[str, list[int]], saved_readers: int, n_readers: int
) -> tuple[dict[int, tuple[int, int, int]], int]:
    """Where each reader starts after a checkpoint: ``(start, start_epoch)``.

    Same reader count: each reader exactly where it stopped. Another count: every reader at
    the start of the epoch after the furthest one reached (see the module docstring).
    """
    if not saved:
        return {}, 0
    places = {int(r): (int(p[0]), int(p[1]), int(p[2])) for r, p in saved.items()}
    if saved_readers == n_readers:
        return places, min(p[0] for p in places.values())
    next_epoch = max(p[0] for p in places.values()) + 1
    logger.warning(
        "resuming with %d readers (processes x train.num_workers) instead of %d: the data "
        "stream continues at the start of epoch %d (exact resume needs the same count)",
        n_readers,
        saved_readers,
        next_epoch,
    )
    return {}, next_epoch
