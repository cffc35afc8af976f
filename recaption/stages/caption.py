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

Two backends write the same rows and stats (``caption.backend``):

- ``transformers`` (the default): the model runs in this process, ``generate`` in padded
  batches of ``caption.batch_size``;
- ``openai``: a client of an OpenAI-compatible chat-completions server (vLLM, SGLang,
  ``transformers serve``), which batches requests itself (continuous batching, paged
  attention). Each sample is one request with the image, downscaled to what the model sees,
  as a PNG data URL (:mod:`recaption.chat_captions`), with ``caption.concurrency`` requests in
  flight. The server is either running already (``caption.endpoint``) or started by the stage
  from ``caption.server.command`` and stopped when the stage ends, however it ends
  (:mod:`recaption.serving`). Undecodable images are error rows and never sent; a request that
  still fails after its retries is an error row; a server that is down, or more failed requests
  than ``caption.max_request_error_rate``, fails the shard (no done marker), and the run goes
  on to the next shard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from recaption.chat_captions import ChatRequest, ChatResult
    from recaption.serving import ManagedServer

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
# One sample of a chunk: (key, alt_text, instruction, error or None).
Item = tuple[str, str, str, str | None]


@dataclass
class PreparedBatch:
    """A batch as a worker hands it over: model inputs for the good images, errors for the rest.

    ``items`` keeps every sample in tar order as ``(key, alt_text, instruction, error)``;
    ``good`` indexes the items whose images are in ``inputs`` (same order).
    """

    index: int
    items: list[Item]
    good: list[int]
    inputs: dict[str, Any] | None
    shard_error: str | None = None


class _ShardChunks(IterableDataset):
    """An ``IterableDataset`` over one shard that yields prepared chunks of samples in order.

    With ``n`` DataLoader workers, worker ``w`` prepares chunks ``w, w + n, w + 2n, ...``; the
    DataLoader takes them round-robin, so chunks arrive in tar order. Each worker streams the
    tar itself (cheap next to decoding) and decodes only its own chunks. A tar that breaks is
    handed over as a chunk with ``shard_error`` set, so the main process fails the shard with
    a clear message.
    """

    def __init__(self, tar_path: Path, template: str, section: CaptionConfig) -> None:
        super().__init__()
        self.tar_path = tar_path
        self.template = template
        self.batch_size = section.batch_size
        self.min_side = section.min_image_side
        self.max_pixels = section.max_image_pixels
        self.max_alt_chars = section.max_alt_text_chars
        self.draft_size: int | None = None

    def decode_chunk(self, samples: list[RawSample]) -> tuple[list[Item], list[Any], list[int]]:
        """Decode a chunk: its items (tar order), the good images, and their item indexes."""
        items: list[Item] = []
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
        return items, images, good

    def prepare(self, index: int, samples: list[RawSample]) -> Any:
        """Prepare chunk ``index`` (its samples in tar order)."""
        raise NotImplementedError

    def broken(self, message: str) -> Any:
        """The chunk that tells the main process the tar is broken."""
        raise NotImplementedError

    #: The first chunk to prepare (the ones before were captioned by an interrupted run).
    start_chunk = 0

    def __iter__(self) -> Iterator[Any]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = 0
        chunk: list[RawSample] = []

        def mine(i: int) -> bool:
            return i >= self.start_chunk and (i - self.start_chunk) % n_workers == worker

        try:
            for sample in iter_tar_samples(self.tar_path):
                chunk.append(sample)
                if len(chunk) == self.batch_size:
                    if mine(index):
                        yield self.prepare(index, chunk)
                    index, chunk = index + 1, []
            if chunk and mine(index):
                yield self.prepare(index, chunk)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield self.broken(
                f"{self.tar_path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                "delete it with its _stats.json and rerun the download for this shard"
            )


class ShardBatches(_ShardChunks):
    """The transformers backend's chunks: model inputs for a batch (:class:`PreparedBatch`)."""

    def __init__(
        self,
        tar_path: Path,
        processor: Any,
        template: str,
        section: CaptionConfig,
    ) -> None:
        super().__init__(tar_path, template, section)
        self.processor = processor
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
        items, images, good = self.decode_chunk(samples)
        inputs = None
        if images:
            instructions = [items[i][2] for i in good]
            try:
                inputs = self._encode(images, instructions)
            except (ValueError, TypeError, RuntimeError, OSError) as exc:
                # One image the processor rejects must not cost the batch: find it alone.
                inputs, good = self._encode_one_by_one(images, instructions, good, items, exc)
        return PreparedBatch(index, items, good, inputs)

    def broken(self, message: str) -> PreparedBatch:
        return PreparedBatch(-1, [], [], None, shard_error=message)

    def _encode_one_by_one(
        self,
        images: list[Any],
        instructions: list[str],
        good: list[int],
        items: list[Item],
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


@dataclass
class PreparedRequests:
    """A chunk as the ``openai`` backend gets it: ``(item index, data URL)`` for each good
    image, errors for the rest (``items`` as in :class:`PreparedBatch`)."""

    index: int
    items: list[Item]
    image_urls: list[tuple[int, str]]
    shard_error: str | None = None


class RequestBatches(_ShardChunks):
    """The ``openai`` backend's chunks: each good image decoded, brought down to the model's
    input side (:func:`recaption.chat_captions.model_view`) and encoded as a PNG data URL."""

    def __init__(
        self, tar_path: Path, template: str, section: CaptionConfig, image_side: int
    ) -> None:
        super().__init__(tar_path, template, section)
        self.image_side = image_side
        self.draft_size = image_side

    def prepare(self, index: int, samples: list[RawSample]) -> PreparedRequests:
        """Decode and encode one chunk of samples; bad ones become error items."""
        from recaption.chat_captions import image_data_url, model_view

        items, images, good = self.decode_chunk(samples)
        urls = []
        for item_index, image in zip(good, images, strict=True):
            urls.append((item_index, image_data_url(model_view(image, self.image_side))))
        return PreparedRequests(index, items, urls)

    def broken(self, message: str) -> PreparedRequests:
        return PreparedRequests(-1, [], [], shard_error=message)


def _size_field(size: Any, key: str) -> int:
    """A field of an image processor's size (a dict, or transformers' ``SizeDict``), or 0."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value or 0)


def decode_size(processor: Any) -> int | None:
    """The fewest pixels per side the model's image processor can use (None: unknown).

    LLaVA-1.5 resizes the shortest edge to 336, then crops 336; LLaVA-NeXT tiles up to its
    largest grid pinpoint, so it needs that many.
    """
    image_processor = getattr(processor, "image_processor", processor)
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


def empty_row(item: Item, model: str, revision: str | None) -> dict[str, Any]:
    """A sample's parquet row before captioning: ``status`` "error" if it has an error."""
    key, alt, instruction, error = item
    return {
        "key": key,
        "caption": None,
        "original_text": alt,
        "model": model,
        "revision": revision,
        "prompt": instruction,
        "n_prompt_tokens": None,
        "n_new_tokens": None,
        "finish_reason": None,
        "status": "error" if error else "ok",
        "error": error,
    }


class ShardParts:
    """The rows of a shard being captioned, saved every few batches: ``captions/_parts/``.

    ``_parts/{shard}-{stamp}/part-NNNNNN.parquet`` holds whole batches, written atomically,
    with the number of batches and new tokens in its metadata. A rerun of an interrupted shard
    loads them and captions only the batches after them; its rows and generation seeds are
    the uninterrupted run's, so the shard's file comes out the same. The stamp (the caption
    config, the batch size and the image shard's signature) keeps parts of another config or
    another download from being used; they are removed instead.
    """

    def __init__(self, output_dir: Path, shard: str, stamp: str) -> None:
        self.root = output_dir / "_parts"
        self.folder = self.root / f"{shard}-{stamp}"
        self.shard = shard

    def load(self) -> tuple[list[dict[str, Any]], int, int]:
        """Rows, new tokens and batches saved by an interrupted run (stale parts removed)."""
        for other in self.root.glob(f"{self.shard}-*"):
            if other != self.folder:
                shutil.rmtree(other, ignore_errors=True)
        rows: list[dict[str, Any]] = []
        tokens = batches = 0
        for path in sorted(self.folder.glob("part-*.parquet")):
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowInvalid):
                break  # the parts after a damaged one cannot be trusted either
            meta = table.schema.metadata or {}
            rows += table.to_pylist()
            tokens += int(meta.get(b"new_tokens", b"0"))
            batches += int(meta.get(b"batches", b"0"))
        if rows:
            logger.info(
                "caption: shard %s resumes after %d saved batch(es) (%d rows)",
                self.shard,
                batches,
                len(rows),
            )
        return rows, tokens, batches

    def save(self, rows: list[dict[str, Any]], new_tokens: int, batches: int) -> None:
        """Save the next whole batches."""
        self.folder.mkdir(parents=True, exist_ok=True)
        index = len(list(self.folder.glob("part-*.parquet")))
        table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA).replace_schema_metadata(
            {"new_tokens": str(new_tokens), "batches": str(batches)}
        )
        with atomic_path(self.folder / f"part-{index:06d}.parquet") as tmp:
            pq.write_table(table, tmp)

    def remove(self) -> None:
        """Drop the parts (the shard's file is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class CaptionWriter:
    """What both backends share: one shard's rows into ``output_dir/{shard}.parquet``, checked
    against img2dataset's list of keys, and the shard's stats.

    A backend implements :meth:`caption_rows` and sets :attr:`model_name` (the ``model``
    column) and :attr:`device` (where captions are made: a device or an endpoint).
    """

    backend = ""

    def __init__(
        self,
        config: RunConfig,
        output_dir: Path,
        stop: StopSignals,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config = config
        self.section = config.caption
        self.output_dir = output_dir
        self.stop = stop
        self.rank = rank
        self.world_size = world_size
        self.template = instruction_template(self.section)
        self.revision = self.section.revision
        self.model_name = self.section.model
        self.device = ""
        self.resumed_rows = 0
        self.finished_parts: ShardParts | None = None

    def caption_rows(self, tar_path: Path, shard: str) -> tuple[list[dict], int, float]:
        """Caption one shard: its rows (tar order), the new tokens generated, and the seconds
        captioning sat idle for want of decoded images."""
        raise NotImplementedError

    def loader(self, dataset: _ShardChunks, *, prefetch: int, pin_memory: bool = False) -> Any:
        """A DataLoader that prepares ``dataset``'s chunks in ``caption.num_workers`` processes."""
        from torch.utils.data import DataLoader

        workers = self.section.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=ignore_stop_signals,
            prefetch_factor=prefetch if workers else None,
            pin_memory=pin_memory,
        )

    def progress(self, shard: str) -> Any:
        """A progress bar for one shard (one line per rank)."""
        from tqdm import tqdm

        return tqdm(
            desc=f"caption [rank {self.rank}] {shard}",
            unit="img",
            position=self.rank,
            leave=False,
            dynamic_ncols=True,
            mininterval=1.0,
        )

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
        rows, n_new_tokens, waiting = self.caption_rows(tar_path, shard)
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
        if self.finished_parts is not None:
            self.finished_parts.remove()  # the shard's file holds every row now
        stats = self.shard_stats(rows, n_new_tokens, time.perf_counter() - start, waiting)
        stats["n_resumed"] = self.resumed_rows  # rows an interrupted run had saved
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
            "model": self.model_name,
            "revision": self.revision,
            "rank": self.rank,
            "world_size": self.world_size,
            "backend": self.backend,
            "device": self.device,
        }


class ShardCaptioner(CaptionWriter):
    """The ``transformers`` backend: one loaded model, ``generate`` in padded batches."""

    backend = "transformers"

    def __init__(
        self,
        config: RunConfig,
        captioner: Any,
        output_dir: Path,
        stop: StopSignals,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, output_dir, stop, rank, world_size)
        self.captioner = captioner
        self.revision = self.section.revision or captioner.revision
        self.device = captioner.device

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
        rows = [empty_row(item, self.model_name, self.revision) for item in batch.items]
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

    def caption_rows(self, tar_path: Path, shard: str) -> tuple[list[dict], int, float]:
        """Stream one shard through the DataLoader and the model, batch by batch, saving the
        rows so far every ``caption.checkpoint_every_batches`` batches (:class:`ShardParts`):
        an interrupted shard resumes after its last saved batch."""
        import torch

        parts = ShardParts(self.output_dir, shard, self.parts_stamp(tar_path))
        rows, n_new_tokens, done_batches = parts.load()
        self.resumed_rows = len(rows)
        dataset = ShardBatches(tar_path, self.captioner.processor, self.template, self.section)
        dataset.start_chunk = done_batches
        loader = self.loader(dataset, prefetch=4, pin_memory=self.device.startswith("cuda"))
        shard_seed = self.section.seed + zlib.crc32(shard.encode())
        pending: list[dict[str, Any]] = []
        pending_tokens = pending_batches = 0
        progress = self.progress(shard)
        progress.update(len(rows))
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
                pending.extend(batch_rows)
                pending_tokens, pending_batches = pending_tokens + n_new, pending_batches + 1
                progress.update(len(batch_rows))
                if pending_batches == self.section.checkpoint_every_batches:
                    parts.save(pending, pending_tokens, pending_batches)
                    rows, n_new_tokens = rows + pending, n_new_tokens + pending_tokens
                    pending, pending_tokens, pending_batches = [], 0, 0
        except (RuntimeError, OSError) as exc:
            if self.stop.requested:  # e.g. a worker killed by the same stop signal
                raise StopRequested(str(exc)) from exc
            raise
        finally:
            progress.close()
            batches = None  # shuts the DataLoader workers down now, not at some later GC
            del loader
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.finished_parts = parts
        return rows + pending, n_new_tokens + pending_tokens, waiting

    def parts_stamp(self, tar_path: Path) -> str:
        """Saved parts are used only by a run with the same outputs and batches."""
        from recaption.config import fingerprint
        from recaption.ledger import file_signature

        section = self.section.fingerprint_dict()
        return fingerprint([section, self.section.batch_size, file_signature(tar_path)])


class ApiShardCaptioner(CaptionWriter):
    """The ``openai`` backend: chat-completions requests to a serving engine.

    Chunks of ``caption.batch_size`` samples are decoded and encoded in DataLoader workers
    (:class:`RequestBatches`); :func:`recaption.chat_captions.run_requests` keeps
    ``caption.concurrency`` requests in flight. ``model`` is the id the server lists in
    ``/v1/models``; ``device`` is the endpoint.
    """

    backend = "openai"

    def __init__(
        self,
        config: RunConfig,
        output_dir: Path,
        stop: StopSignals,
        *,
        endpoint: str,
        image_side: int,
        api_key: str | None = None,
        server: ManagedServer | None = None,
        wanted_models: tuple[str, ...] = (),
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, output_dir, stop, rank, world_size)
        self.endpoint = endpoint
        self.device = endpoint
        self.image_side = image_side
        self._api_key = api_key
        self.server = server
        self.wanted_models = wanted_models

    def client(self) -> Any:
        """A :class:`recaption.chat_captions.ChatCaptionClient` for this config."""
        from recaption.chat_captions import ChatCaptionClient, RetryPolicy, generation_options

        s = self.section
        options = generation_options(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.do_sample,
            temperature=s.temperature,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            min_new_tokens=s.min_new_tokens,
            seed=s.seed,
        )
        return ChatCaptionClient(
            self.endpoint,
            options=options,
            request_timeout=s.request_timeout,
            retry=RetryPolicy(s.max_retries, s.retry_backoff),
            api_key=self._api_key,
            api_key_env=s.api_key_env,
            server_problem=self.server.problem if self.server is not None else None,
        )

    def caption_rows(self, tar_path: Path, shard: str) -> tuple[list[dict], int, float]:
        """Send one shard's samples to the server and build its rows (tar order)."""
        from recaption.chat_captions import ChatRequest, EndpointError

        dataset = RequestBatches(tar_path, self.template, self.section, self.image_side)
        loader = self.loader(dataset, prefetch=2)
        rows: list[dict[str, Any]] = []
        progress = self.progress(shard)
        batches = iter(loader)  # in this thread: the DataLoader starts its workers here

        def requests() -> Iterator[list[ChatRequest]]:
            for chunk in batches:
                if chunk.shard_error:
                    raise ShardError(chunk.shard_error)
                base = len(rows)
                rows.extend(empty_row(item, "", self.revision) for item in chunk.items)
                progress.update(len(chunk.items) - len(chunk.image_urls))
                yield [ChatRequest(base + i, chunk.items[i][2], url) for i, url in chunk.image_urls]

        source = requests()
        try:
            report = asyncio.run(self._run(source, progress))
        except EndpointError as exc:
            raise ShardError(str(exc)) from None
        except (RuntimeError, OSError) as exc:
            if self.stop.requested:  # e.g. a worker killed by the same stop signal
                raise StopRequested(str(exc)) from exc
            raise
        finally:
            progress.close()
            source.close()  # a generator stopped mid-shard lets go of the DataLoader now
            batches = None  # shuts the DataLoader workers down now, not at some later GC
            del loader
        n_new_tokens = self._fill_rows(rows, report.results)
        if report.retries:
            logger.info("caption: shard %s needed %d retried request(s)", shard, report.retries)
        return rows, n_new_tokens, report.seconds_waiting_for_images

    async def _run(self, requests: Iterator[list[ChatRequest]], progress: Any) -> Any:
        from recaption.chat_captions import run_requests

        async with self.client() as client:
            self.model_name = await client.choose_model(self.wanted_models)
            return await run_requests(
                client,
                requests,
                concurrency=self.section.concurrency,
                check_stop=self.stop.check,
                on_result=lambda _: progress.update(1),
            )

    def _fill_rows(self, rows: list[dict[str, Any]], results: list[ChatResult]) -> int:
        """Put the answers into the rows; fail the shard if too many requests failed."""
        n_new_tokens = 0
        failed: list[tuple[str, str]] = []
        for row in rows:
            row["model"] = self.model_name
        for result in results:
            row = rows[result.index]
            if result.error is not None:
                row.update(status="error", error=result.error)
                failed.append((row["key"], result.error))
                continue
            row.update(
                caption=result.caption,
                n_prompt_tokens=result.n_prompt_tokens,
                n_new_tokens=result.n_new_tokens,
                finish_reason=result.finish_reason,
            )
            n_new_tokens += result.n_new_tokens or 0
        limit = self.section.max_request_error_rate
        if results and len(failed) > limit * len(results):
            key, error = failed[0]
            raise ShardError(
                f"{len(failed)} of {len(results)} requests to {self.endpoint} "
                f"failed after their retries, more than caption.max_request_error_rate="
                f"{limit:g} allows (e.g. key {key!r}: {error}); the shard is not marked done, "
                "so a rerun sends them again. Check the server's log"
            )
        return n_new_tokens


# -- the stage -----------------------------------------------------------------------------------
API_KEY_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def model_input_side(model: str, section: CaptionConfig) -> int:
    """The fewest pixels per side the model's image processor uses (336 for LLaVA-1.5), read
    from the checkpoint's processor config; raises :class:`ValueError` saying what to set."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(
            model, revision=section.revision, trust_remote_code=section.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"caption.request_image_side is not set and the image processor of caption.model "
            f"{section.model!r} cannot be read to find the model's input size ({exc}); set "
            "caption.request_image_side (336 for LLaVA-1.5, 672 for LLaVA-NeXT), or make the "
            "checkpoint available here"
        ) from exc
    side = decode_size(processor)
    if not side:
        raise ValueError(
            f"the image processor of caption.model {section.model!r} does not say its input "
            "size; set caption.request_image_side to the side in pixels the model sees"
        )
    return side


class CaptionStage(ShardedStage):
    """Caption every finished image shard (see the module docstring)."""

    name = "caption"
    input_stage = "download"  # a redownloaded image shard (new marker) makes its captions stale
    output_suffixes = (".parquet",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server: ManagedServer | None = None

    def check(self) -> None:
        from recaption.demo.models import resolve_model
        from recaption.models.llava import check_checkpoint

        section = self.config.caption
        self.template = instruction_template(section)  # a bad prompt config stops here
        if section.backend == "openai":
            self._check_openai(section)
            self.model_path = resolve_model(self.config, section.model)
            return
        self.model_path = resolve_model(self.config, section.model)
        check_checkpoint(self.model_path, section.revision, section.trust_remote_code)

    @staticmethod
    def _check_openai(section: CaptionConfig) -> None:
        """What the config alone cannot tell: the client package, the server program, the
        key's environment variable."""
        from recaption.serving import executable_problem, visible_gpus

        try:
            import openai  # noqa: F401
        except ImportError:
            raise ValueError(
                "caption.backend is 'openai' but the openai package is not installed; install "
                "the serving extra: pip install -e '.[serve]'"
            ) from None
        command = section.server.command
        if command:
            problem = executable_problem(command)
            if problem:
                raise ValueError(f"caption.server.command: {problem}")
            if "{gpus}" in command and visible_gpus() == 0:
                raise ValueError(
                    "caption.server.command uses {gpus}, but no GPU is visible to this task "
                    "(CUDA_VISIBLE_DEVICES, torch.cuda); run it on a GPU node, or write the "
                    "engine's parallelism into the command"
                )
        name = section.api_key_env
        if name is not None:
            if not API_KEY_ENV_NAME.fullmatch(name):
                # Never echo it: a key written here by mistake must not reach the log.
                raise ValueError(
                    "caption.api_key_env must be the name of an environment variable (letters, "
                    "digits and _), such as VLLM_API_KEY; the key itself never goes into the "
                    "config"
                )
            if not os.environ.get(name):
                raise ValueError(
                    f"caption.api_key_env names ${name}, which is not set or empty here; "
                    f"export {name}=... (the server's API key) before running the stage"
                )

    def setup(self) -> None:
        if self.config.caption.backend == "openai":
            self._setup_openai()
            return
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
        self.worker: CaptionWriter = ShardCaptioner(
            self.config,
            captioner,
            self.output_dir,
            self.stop,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def _setup_openai(self) -> None:
        from recaption.serving import ManagedServer

        section = self.config.caption
        side = section.request_image_side or model_input_side(self.model_path, section)
        api_key = os.environ[section.api_key_env] if section.api_key_env else None
        if section.server.command:
            records = self.output_dir / "_ledger"
            self.server = ManagedServer(
                section.server.command,
                host=section.server.host,
                port=section.server.port,
                model=self.model_path,
                log_path=records / f"server-rank{self.ctx.rank}.log",
                state_path=records / f"server-rank{self.ctx.rank}.json",
                startup_timeout=section.server.startup_timeout,
                stop_timeout=section.server.stop_timeout,
                api_key=api_key,
            )
            endpoint = self.server.start()
        else:
            assert section.endpoint is not None  # the config refuses neither
            endpoint = section.endpoint
        logger.info(
            "caption: openai backend on %s, %d request(s) in flight, images sent at %d px "
            "(shorter side), instruction %r",
            endpoint,
            section.concurrency,
            side,
            self.template,
        )
        self.worker = ApiShardCaptioner(
            self.config,
            self.output_dir,
            self.stop,
            endpoint=endpoint,
            image_side=side,
            api_key=api_key,
            server=self.server,
            wanted_models=(section.model, self.model_path),
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def process(self, shard: str) -> dict[str, Any]:
        return self.worker.caption_shard(shard)

    def extra_outputs(self, shard: str) -> list[Path]:
        return list((self.output_dir / "_parts").glob(f"{shard}-*"))

    def teardown(self) -> None:
        """Stop the server the stage started (every exit path: done, failed, stopped)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
