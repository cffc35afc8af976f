"""Caption stage: a new, dense caption for every downloaded image, written by LLaVA.

For each pending shard of ``run_dir/images/`` (an img2dataset tar whose ``{shard}_stats.json``
says the download finished) the stage streams the tar's samples, decodes and preprocesses the
images in DataLoader worker processes (so decoding overlaps generation), generates captions in
batches, and writes ``run_dir/captions/{shard}.parquet`` with one row per input sample:

``key, caption, original_text, model, revision, prompt, n_prompt_tokens, n_new_tokens,
finish_reason ("stop" | "length"), status ("ok" | "error"), error``

then the shard's stats JSON (counts, images/s, new tokens/s, seconds, and the seconds the
model sat waiting for decoded images) as its done marker. ``prompt`` is the instruction given
(with the alt-text filled in for a custom template); ``n_prompt_tokens`` counts the prompt as
the language model sees it, image tokens included; ``n_new_tokens`` counts generated tokens,
the end token included; ``finish_reason`` is "length" when ``max_new_tokens`` cut the caption.

Awkward but valid images (grayscale, palette, RGBA, 16-bit, CMYK) are converted to RGB and
captioned like any other (see :mod:`recaption.images`).

A bad image (corrupt, empty, a decompression bomb, a side of 1 pixel, no image member) becomes
an ``error`` row and the rest of its batch is captioned as usual. A truncated or unreadable tar
fails its shard only. Several GPUs: ``torchrun --nproc-per-node N -m recaption caption CONFIG``
runs one process per GPU, each on ``cuda:$LOCAL_RANK``, each on its own shards; no process
group is needed because ranks share nothing but the ledger.
"""

from __future__ import annotations

import logging
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from recaption.config import CaptionConfig, RunConfig
from recaption.driver import ShardedStage
from recaption.images import ImageDecodeError, decode_image
from recaption.ledger import STATS_SUFFIX, ShardError, atomic_path
from recaption.schemas import CAPTION_SCHEMA
from recaption.shards import RawSample, expected_keys, iter_tar_samples
from recaption.signals import StopRequested, StopSignals, ignore_stop_signals

logger = logging.getLogger(__name__)

STAGE = "caption"

PROMPT_PRESETS: dict[str, str] = {
    # KOALA and PixArt-alpha recaptioned their training images with this instruction.
    "dense": "Describe this image and its style in a very detailed manner.",
    "short": "Describe this image in one sentence.",
}


# -- prompts -------------------------------------------------------------------------------------
def instruction_template(section: CaptionConfig) -> str:
    """The instruction the config asks for; ``{alt_text}`` is filled per sample."""
    if section.prompt == "custom":
        if not section.custom_prompt or not section.custom_prompt.strip():
            raise ValueError(
                "caption.prompt is 'custom' but caption.custom_prompt is empty; write the "
                "instruction there, e.g. 'Describe this image. Its original caption was: "
                "{alt_text}'"
            )
        return section.custom_prompt
    if section.custom_prompt:
        raise ValueError(
            f"caption.custom_prompt is set but caption.prompt is {section.prompt!r}; set "
            "caption.prompt: custom to use it, or remove caption.custom_prompt"
        )
    return PROMPT_PRESETS[section.prompt]


def fill_instruction(template: str, alt_text: str, max_chars: int) -> str:
    """``template`` with ``{alt_text}`` replaced by the (shortened, one-line) original text."""
    if "{alt_text}" not in template:
        return template
    hint = " ".join(alt_text.split())[:max_chars]
    return template.replace("{alt_text}", hint)


# -- decoding in DataLoader workers --------------------------------------------------------------
@dataclass
class PreparedBatch:
    """A batch as a worker hands it over: model inputs for the good images, errors for the rest.

    ``items`` keeps every sample in tar order as ``(key, alt_text, instruction, error)``;
    ``good`` indexes the items whose images are in ``inputs`` (same order).
    """

    index: int
    items: list[tuple[str, str, str, str | None]]
    good: list[int]
    inputs: dict[str, Any] | None
    shard_error: str | None = None


class ShardBatches(IterableDataset):
    """An ``IterableDataset`` over one shard that yields :class:`PreparedBatch`-es in order.

    With ``n`` DataLoader workers, worker ``w`` prepares batches ``w, w + n, w + 2n, ...``; the
    DataLoader takes them round-robin, so batches arrive in tar order. Each worker streams the
    tar itself (cheap next to decoding) and decodes only its own batches.
    """

    def __init__(
        self,
        tar_path: Path,
        processor: Any,
        template: str,
        section: CaptionConfig,
    ) -> None:
        super().__init__()
        self.tar_path = tar_path
        self.processor = processor
        self.template = template
        self.batch_size = section.batch_size
        self.min_side = section.min_image_side
        self.max_pixels = section.max_image_pixels
        self.max_alt_chars = section.max_alt_text_chars
        self.draft_size = decode_size(processor)
        self._prompt_cache: dict[str, str] = {}

    def _chat_prompt(self, instruction: str) -> str:
        from recaption.models.llava import chat_prompt

        prompt = self._prompt_cache.get(instruction)
        if prompt is None:
            prompt = chat_prompt(self.processor, instruction)
            if len(self._prompt_cache) < 64:
                self._prompt_cache[instruction] = prompt
        return prompt

    def _encode(self, images: list[Any], instructions: list[str]) -> dict[str, Any]:
        texts = [self._chat_prompt(i) for i in instructions]
        encoded = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        return dict(encoded)

    def prepare(self, index: int, samples: list[RawSample]) -> PreparedBatch:
        """Decode and preprocess one batch of samples; bad ones become error items."""
        items: list[tuple[str, str, str, str | None]] = []
        images: list[Any] = []
        good: list[int] = []
        for sample in samples:
            alt = sample.alt_text()
            instruction = fill_instruction(self.template, alt, self.max_alt_chars)
            data = sample.image_bytes()
            error = None
            if data is None:
                found = ", ".join(sorted(sample.members)) or "none"
                error = f"no image member in the tar for this key (members: {found})"
            else:
                try:
                    images.append(
                        decode_image(
                            data,
                            min_side=self.min_side,
                            max_pixels=self.max_pixels,
                            draft_size=self.draft_size,
                        )
                    )
                    good.append(len(items))
                except ImageDecodeError as exc:
                    error = str(exc)
            items.append((sample.key, alt, instruction, error))
        inputs = None
        if images:
            instructions = [items[i][2] for i in good]
            try:
                inputs = self._encode(images, instructions)
            except (ValueError, TypeError, RuntimeError, OSError) as exc:
                # One image the processor rejects must not cost the batch: find it alone.
                inputs, good = self._encode_one_by_one(images, instructions, good, items, exc)
        return PreparedBatch(index, items, good, inputs)

    def _encode_one_by_one(
        self,
        images: list[Any],
        instructions: list[str],
        good: list[int],
        items: list[tuple[str, str, str, str | None]],
        batch_error: Exception,
    ) -> tuple[dict[str, Any] | None, list[int]]:
        kept: list[int] = []
        kept_images, kept_instructions = [], []
        for image, instruction, item_index in zip(images, instructions, good, strict=True):
            try:
                self._encode([image], [instruction])
            except (ValueError, TypeError, RuntimeError, OSError) as exc:
                key, alt, instr, _ = items[item_index]
                items[item_index] = (key, alt, instr, f"preprocessing failed: {exc}")
                continue
            kept.append(item_index)
            kept_images.append(image)
            kept_instructions.append(instruction)
        if not kept:
            return None, []
        logger.debug("batch preprocessing failed (%s); isolated the bad image(s)", batch_error)
        return self._encode(kept_images, kept_instructions), kept

    def __iter__(self) -> Iterator[PreparedBatch]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = 0
        chunk: list[RawSample] = []
        try:
            for sample in iter_tar_samples(self.tar_path):
                chunk.append(sample)
                if len(chunk) == self.batch_size:
                    if index % n_workers == worker:
                        yield self.prepare(index, chunk)
                    index, chunk = index + 1, []
            if chunk and index % n_workers == worker:
                yield self.prepare(index, chunk)
        except (tarfile.TarError, OSError, EOFError) as exc:
            # Handed over as data, so the main process can fail the shard with a clear message.
            message = (
                f"{self.tar_path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                "delete it with its _stats.json and rerun the download for this shard"
            )
            yield PreparedBatch(-1, [], [], None, shard_error=message)


def _size_field(size: Any, key: str) -> int:
    """A field of an image processor's size (a dict, or transformers' ``SizeDict``), or 0."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value or 0)


def decode_size(processor: Any) -> int | None:
    """The fewest pixels per side the model's image processor can use (None: unknown).

    LLaVA-1.5 resizes the shortest edge to 336, then crops 336; LLaVA-NeXT tiles up to its
    largest grid pinpoint, so it needs that many.
    """
    image_processor = getattr(processor, "image_processor", None)
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        return max(max(p) for p in pinpoints)
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    sides = [_size_field(size, k) for k in ("shortest_edge", "height", "width")]
    sides += [_size_field(crop, k) for k in ("height", "width")]
    return max(sides) or None


# -- generation ----------------------------------------------------------------------------------
def finish_tokens(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], int, str]:
    """Split generated ``tokens`` at the first end token.

    Returns the caption's tokens, how many tokens were generated (the end token included,
    the padding after it not), and the finish reason: "stop" if an end token came,
    "length" if the token budget ran out first.
    """
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i], i + 1, "stop"
    return tokens, len(tokens), "length"


class ShardCaptioner:
    """Captions whole shards with one loaded model into ``output_dir/{shard}.parquet``."""

    def __init__(
        self,
        config: RunConfig,
        captioner: Any,
        output_dir: Path,
        stop: StopSignals,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config = config
        self.section = config.caption
        self.captioner = captioner
        self.output_dir = output_dir
        self.stop = stop
        self.rank = rank
        self.world_size = world_size
        self.template = instruction_template(self.section)
        self.revision = self.section.revision or captioner.revision

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate``: greedy unless sampling is switched on."""
        s = self.section
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "do_sample": s.do_sample,
            "repetition_penalty": s.repetition_penalty,
            "pad_token_id": self.captioner.pad_token_id,
        }
        if s.min_new_tokens:
            kwargs["min_new_tokens"] = min(s.min_new_tokens, s.max_new_tokens)
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate(self, inputs: dict[str, Any], seed: int) -> tuple[list[list[int]], list[int]]:
        """Run ``generate`` on one prepared batch; the new tokens and prompt lengths per row."""
        import torch

        c = self.captioner
        moved = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(c.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(c.dtype)
            moved[name] = value
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = c.model.generate(**moved, **self.generation_kwargs())
        prompt_len = moved["input_ids"].shape[1]
        new_tokens = output[:, prompt_len:].cpu().tolist()
        prompt_tokens = moved["attention_mask"].sum(dim=1).cpu().tolist()
        return new_tokens, [int(n) for n in prompt_tokens]

    def batch_rows(self, batch: PreparedBatch, shard_seed: int) -> tuple[list[dict], int]:
        """The parquet rows of one batch (tar order) and the number of new tokens generated."""
        c = self.captioner
        rows: list[dict[str, Any]] = []
        for key, alt, instruction, error in batch.items:
            rows.append(
                {
                    "key": key,
                    "caption": None,
                    "original_text": alt,
                    "model": self.section.model,
                    "revision": self.revision,
                    "prompt": instruction,
                    "n_prompt_tokens": None,
                    "n_new_tokens": None,
                    "finish_reason": None,
                    "status": "error" if error else "ok",
                    "error": error,
                }
            )
        n_new = 0
        if batch.inputs is not None and batch.good:
            new_tokens, prompt_tokens = self.generate(batch.inputs, shard_seed + batch.index)
            eos = c.eos_token_ids
            for row_index, tokens, n_prompt in zip(
                batch.good, new_tokens, prompt_tokens, strict=True
            ):
                caption_tokens, n_generated, reason = finish_tokens(tokens, eos)
                rows[row_index].update(
                    caption=c.processor.tokenizer.decode(
                        caption_tokens, skip_special_tokens=True
                    ).strip(),
                    n_prompt_tokens=n_prompt,
                    n_new_tokens=n_generated,
                    finish_reason=reason,
                )
                n_new += n_generated
        return rows, n_new

    def caption_batches(self, tar_path: Path, shard: str) -> tuple[list[dict], int, float]:
        """Stream one shard through the DataLoader and the model, batch by batch.

        Returns the rows (tar order), the new tokens generated and the seconds the model sat
        idle for want of decoded images.
        """
        import torch
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        dataset = ShardBatches(tar_path, self.captioner.processor, self.template, self.section)
        workers = self.section.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=ignore_stop_signals,
            prefetch_factor=4 if workers else None,
            pin_memory=self.captioner.device.startswith("cuda"),
        )
        shard_seed = self.section.seed + zlib.crc32(shard.encode())
        rows: list[dict[str, Any]] = []
        n_new_tokens = 0
        progress = tqdm(
            desc=f"caption [rank {self.rank}] {shard}",
            unit="img",
            position=self.rank,
            leave=False,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        waiting = 0.0
        batches = None
        try:
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                waiting += time.perf_counter() - t0
                if batch is None:
                    break
                self.stop.check()
                if batch.shard_error:
                    raise ShardError(batch.shard_error)
                batch_rows, n_new = self.batch_rows(batch, shard_seed)
                rows.extend(batch_rows)
                n_new_tokens += n_new
                progress.update(len(batch_rows))
        except (RuntimeError, OSError) as exc:
            if self.stop.requested:  # e.g. a worker killed by the same stop signal
                raise StopRequested(str(exc)) from exc
            raise
        finally:
            progress.close()
            batches = None  # shuts the DataLoader workers down now, not at some later GC
            del loader
        if torch.cuda.is_available() and self.captioner.device.startswith("cuda"):
            torch.cuda.synchronize()
        return rows, n_new_tokens, waiting

    def caption_shard(self, shard: str) -> dict[str, Any]:
        """Caption one shard and write ``captions/{shard}.parquet``; returns its stats."""
        images_dir = self.config.images_dir
        tar_path = images_dir / f"{shard}.tar"
        if not tar_path.exists():
            raise ShardError(
                f"{tar_path} is missing although {shard}{STATS_SUFFIX} marks the download done; "
                "delete the marker and rerun the download for this shard"
            )
        start = time.perf_counter()
        rows, n_new_tokens, waiting = self.caption_batches(tar_path, shard)
        expected = expected_keys(images_dir, shard)
        seen = {row["key"] for row in rows}
        if expected is not None and not expected <= seen:
            missing = sorted(expected - seen)
            raise ShardError(
                f"{tar_path} holds {len(seen)} samples but {shard}.parquet lists "
                f"{len(expected)} successful downloads ({len(missing)} missing, e.g. "
                f"{missing[0]!r}): the tar is probably truncated; delete it with its "
                "_stats.json and rerun the download for this shard"
            )
        with atomic_path(self.output_dir / f"{shard}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA), tmp)
        stats = self.shard_stats(rows, n_new_tokens, time.perf_counter() - start, waiting)
        logger.info(
            "caption: shard %s done: %d images (%d ok, %d failed), %.1f images/s, "
            "%.0f new tokens/s, %.1fs",
            shard,
            len(rows),
            stats["n_ok"],
            stats["n_failed"],
            stats["images_per_s"] or 0.0,
            stats["new_tokens_per_s"] or 0.0,
            stats["seconds"],
        )
        return stats

    def shard_stats(
        self, rows: list[dict[str, Any]], n_new_tokens: int, seconds: float, waiting: float
    ) -> dict[str, Any]:
        """The shard's done-marker stats: counts, speed, error histogram, provenance."""
        n_ok = sum(row["status"] == "ok" for row in rows)
        errors: dict[str, int] = {}
        for row in rows:
            if row["error"]:
                reason = row["error"].split(":")[0].split("(")[0].strip()
                errors[reason] = errors.get(reason, 0) + 1
        return {
            "n_input": len(rows),
            "n_ok": n_ok,
            "n_failed": len(rows) - n_ok,
            "n_finish_length": sum(row["finish_reason"] == "length" for row in rows),
            "n_new_tokens": n_new_tokens,
            "seconds": round(seconds, 3),
            "seconds_waiting_for_images": round(waiting, 3),
            "images_per_s": round(len(rows) / seconds, 3) if seconds > 0 else None,
            "new_tokens_per_s": round(n_new_tokens / seconds, 3) if seconds > 0 else None,
            "errors": errors,
            "model": self.section.model,
            "revision": self.revision,
            "rank": self.rank,
            "world_size": self.world_size,
            "device": self.captioner.device,
        }


# -- the stage -----------------------------------------------------------------------------------
class CaptionStage(ShardedStage):
    """Caption every finished image shard (see the module docstring)."""

    name = "caption"
    input_stage = "download"  # a redownloaded image shard (new marker) makes its captions stale
    output_suffixes = (".parquet",)

    def check(self) -> None:
        from recaption.demo.models import resolve_model
        from recaption.models.llava import check_checkpoint

        section = self.config.caption
        self.template = instruction_template(section)  # a bad prompt config stops here
        self.model_path = resolve_model(self.config, section.model)
        check_checkpoint(self.model_path, section.revision, section.trust_remote_code)

    def setup(self) -> None:
        from recaption.distributed import default_device
        from recaption.models.llava import load_captioner

        section = self.config.caption
        captioner = load_captioner(
            self.model_path,
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            dtype=section.dtype,
            device=section.device or default_device(),
            name=section.model,
        )
        logger.info("caption: instruction %r, batch %d", self.template, section.batch_size)
        self.worker = ShardCaptioner(
            self.config,
            captioner,
            self.output_dir,
            self.stop,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def process(self, shard: str) -> dict[str, Any]:
        return self.worker.caption_shard(shard)
