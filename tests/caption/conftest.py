"""Fixtures for the caption stage: img2dataset-layout shards, bad inputs, tiny LLaVA models."""

from __future__ import annotations

import io
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]

Sample = dict[str, Any]  # {"key": str, "image": bytes | None, "ext": str, "text": str}


def draw_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small drawn picture: a coloured shape on a coloured background."""
    rng = random.Random(seed)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    w, h = size
    box = [rng.randrange(w // 2), rng.randrange(h // 2), w // 2 + rng.randrange(w // 2), h - 1]
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=colour())
    return image


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def good_samples(shard: int, n: int) -> list[Sample]:
    """``n`` ordinary samples; keys follow img2dataset's shard-prefixed numbering."""
    out = []
    for i in range(n):
        seed = shard * 1000 + i
        size = (40 + (seed * 7) % 60, 40 + (seed * 13) % 50)
        out.append(
            {
                "key": f"{shard:05d}{i:04d}",
                "image": encode(draw_image(seed, size), quality=90),
                "ext": "jpg",
                "text": f"a picture number {i} of shard {shard}",
            }
        )
    return out


def png16(width: int = 40, height: int = 30) -> bytes:
    """A 16-bit grayscale PNG with a ramp over the full 0..65535 range."""
    ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def bad_samples() -> list[tuple[Sample, str | None]]:
    """The awkward inputs, each with the error it must give (None: it must be captioned)."""
    base = draw_image(7, (48, 40))
    corrupt = bytearray(encode(base, quality=90))
    corrupt = bytes(corrupt[:200]) + bytes(len(corrupt) - 200)  # header kept, data zeroed
    palette_t = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    bomb = encode(Image.new("1", (10_000, 9_000)), "PNG")  # 90 Mpx > PIL's 89.5 Mpx
    rows: list[tuple[str, bytes | None, str, str | None]] = [
        ("corrupt_jpeg", corrupt[:300], "jpg", "corrupt image data"),
        ("zero_byte", b"", "jpg", "empty image file"),
        ("not_an_image", b"<html>404 not found</html>", "jpg", "not a readable image"),
        ("gray_png", encode(base.convert("L"), "PNG"), "png", None),
        ("rgba_png", encode(base.convert("RGBA"), "PNG"), "png", None),
        ("palette_png", encode(palette_t, "PNG"), "png", None),
        ("png_16bit", png16(), "png", None),
        ("cmyk_jpeg", encode(base.convert("CMYK"), "JPEG"), "jpg", None),
        ("one_pixel", encode(Image.new("RGB", (1, 300), (9, 9, 9)), "PNG"), "png", "too small"),
        ("bomb", bomb, "png", "too large"),
        ("no_image", None, "jpg", "no image member"),
    ]
    out = []
    for i, (name, data, ext, expected) in enumerate(rows):
        sample = {"key": f"bad{i:02d}_{name}", "image": data, "ext": ext, "text": name}
        out.append((sample, expected))
    return out


def write_shard(images_dir: Path, shard: str, samples: list[Sample], *, done: bool = True) -> Path:
    """Write ``shard`` as img2dataset does: tar, parquet of attempts, then ``_stats.json``."""
    images_dir.mkdir(parents=True, exist_ok=True)
    tar_path = images_dir / f"{shard}.tar"
    rows = []
    with wds.TarWriter(str(tar_path)) as sink:
        for s in samples:
            meta = {
                "url": f"http://127.0.0.1/{s['key']}.{s['ext']}",
                "key": s["key"],
                "status": "success",
                "caption": s["text"],
                "error_message": None,
                "width": 64,
                "height": 48,
                "original_width": 64,
                "original_height": 48,
                "sha256": "0" * 64,
                "AESTHETIC_SCORE": 6.5,
            }
            record: dict[str, Any] = {"__key__": s["key"], "txt": s["text"], "json": meta}
            if s["image"] is not None:
                record[s["ext"]] = s["image"]
            sink.write(record)
            rows.append({"key": s["key"], "url": meta["url"], "caption": s["text"], **meta})
    pq.write_table(pa.Table.from_pylist(rows), images_dir / f"{shard}.parquet")
    if done:
        stats = {
            "count": len(samples),
            "successes": len(samples),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": len(samples)},
        }
        (images_dir / f"{shard}_stats.json").write_text(json.dumps(stats))
    return tar_path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of tiny demo models for the whole session (built on first use)."""
    return tmp_path_factory.mktemp("demo_models")


@pytest.fixture(scope="session")
def make_config(models_dir: Path) -> Callable[..., Path]:
    """Write a run config for ``run_dir`` with caption overrides; returns the YAML path."""

    def make(run_dir: Path, **caption: Any) -> Path:
        section = {
            "model": "demo:tiny-llava-1.5",
            "dtype": "float32",
            "batch_size": 4,
            "num_workers": 1,
            "max_new_tokens": 6,
            "device": "cpu",
            **caption,
        }
        data = {"run_dir": str(run_dir), "demo": {"models_dir": str(models_dir)}}
        data["caption"] = section
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture
def demo_run(tmp_path: Path) -> Path:
    """A run folder with three finished demo shards (7, 6, 5 images) and one unfinished."""
    run_dir = tmp_path / "run"
    for shard, n in ((0, 7), (1, 6), (2, 5)):
        write_shard(run_dir / "images", f"{shard:05d}", good_samples(shard, n))
    write_shard(run_dir / "images", "00003", good_samples(3, 4), done=False)
    return run_dir


def cli_env() -> dict[str, str]:
    """Environment for running ``python -m recaption`` in a subprocess from the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", NO_ALBUMENTATIONS_UPDATE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID"):
        env.pop(name, None)
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def shard_writer() -> Callable[..., Path]:
    """``write_shard(images_dir, shard, samples, done=True)``: an img2dataset-layout shard."""
    return write_shard


@pytest.fixture(scope="session")
def samples() -> Callable[[int, int], list[Sample]]:
    """``samples(shard, n)``: ordinary drawn-image samples."""
    return good_samples


@pytest.fixture
def bad_inputs() -> list[tuple[Sample, str | None]]:
    """Awkward samples, each with the error it must produce (None: captioned normally)."""
    return bad_samples()


def read_captions(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every finished caption shard of a run: shard id -> its rows."""
    captions_dir = run_dir / "captions"
    return {
        p.name[: -len(".parquet")]: pq.read_table(p).to_pylist()
        for p in sorted(captions_dir.glob("*.parquet"))
        if (captions_dir / p.name.replace(".parquet", "_stats.json")).exists()
    }


@pytest.fixture(scope="session")
def captions_of() -> Callable[[Path], dict[str, list[dict[str, Any]]]]:
    """``captions_of(run_dir)``: shard id -> caption rows of every finished shard."""
    return read_captions


@pytest.fixture(scope="session")
def caption_stage() -> Callable[..., Any]:
    """``caption_stage(config_path, *overrides, rank=0, world_size=1)``: run the stage here."""

    def run_stage(config_path: Path, *overrides: str, rank: int = 0, world_size: int = 1) -> Any:
        from recaption.config import load_config
        from recaption.stages import StageContext, run

        config = load_config(config_path, list(overrides))
        return run("caption", StageContext(config, rank=rank, world_size=world_size))

    return run_stage
