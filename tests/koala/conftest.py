"""Fixtures for the KOALA tests: a tiny SDXL teacher and merge-stage webdataset shards."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
import yaml
from PIL import Image, ImageDraw

from recaption.config import RunConfig, load_config
from recaption.ledger import StageSummary
from recaption.stages import StageContext
from recaption.stages import run as run_stage

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square")


def draw_sample(rng: random.Random) -> tuple[bytes, str, str, int, int]:
    """A JPEG of a coloured shape on a coloured background, its caption and alt-text."""
    fg, bg = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    width, height = rng.choice([(80, 64), (64, 96), (72, 72)])
    image = Image.new("RGB", (width, height), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[fg])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    caption = f"A {fg} {shape} in the middle of a plain {bg} background."
    return buf.getvalue(), caption, f"{fg} {shape}", width, height


def write_shard(
    path: Path, n: int, seed: int, corrupt_keys: tuple[str, ...] = (), caption_tail: str = ""
) -> list[str]:
    """Write a merge-stage shard: ``{key}.jpg``, ``{key}.txt``, ``{key}.json`` per sample,
    and the merge stage's done marker beside it."""
    rng = random.Random(seed)
    keys = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            key = f"{seed:03d}{i:05d}"
            jpg, caption, alt, width, height = draw_sample(rng)
            caption += caption_tail
            if key in corrupt_keys:
                jpg = jpg[:40]  # a truncated JPEG header: does not decode
            meta = {
                "url": f"http://127.0.0.1/{key}.jpg",
                "original_text": alt,
                "synthetic_caption": caption,
                "caption_model": "demo:tiny-llava-1.5",
                "prompt": "Describe the image.",
                "width": width,
                "height": height,
                "aesthetic_score": 6.5,
            }
            sink.write(
                {
                    "__key__": key,
                    "jpg": jpg,
                    "txt": caption.encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
            keys.append(key)
    # Like merge's marker, it changes whenever the shard is written again.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(f"{path.stem}_stats.json").write_text(json.dumps({"n_ok": n, "sha": digest}))
    return keys


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared folder of demo models: the tiny SDXL is built once per test session."""
    return tmp_path_factory.mktemp("demo_models")


TRAIN_DEFAULTS: dict[str, Any] = {
    "teacher": "demo:tiny-sdxl",
    "teacher_dtype": "float32",
    "mixed_precision": "no",
    "resolution": 64,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 2,
    "max_steps": 6,
    "checkpointing_steps": 3,
    "num_workers": 0,
    "log_every": 1,
    "ema_decay": 0.5,
    "empty_prompt_ratio": 0.1,
    "synthetic_caption_ratio": 0.9,
}


@pytest.fixture()
def make_run(tmp_path: Path, models_dir: Path) -> Callable[..., tuple[RunConfig, Path]]:
    """``make_run(train={...}, sample={...}, shards=2)``: a run_dir with merged shards and its
    config file; returns ``(config, config_path)``."""

    def make(
        train: dict[str, Any] | None = None,
        sample: dict[str, Any] | None = None,
        shards: int = 2,
        per_shard: int = 12,
        corrupt: bool = True,
        run_dir: Path | None = None,
    ) -> tuple[RunConfig, Path]:
        run_dir = run_dir or tmp_path / "run"
        webdataset_dir = run_dir / "dataset" / "webdataset"
        webdataset_dir.mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            corrupt_keys = (f"{s:03d}00003",) if corrupt and s == 0 else ()
            write_shard(
                webdataset_dir / f"{s:05d}.tar", per_shard, seed=s, corrupt_keys=corrupt_keys
            )
        data = {
            "run_dir": str(run_dir),
            "demo": {"models_dir": str(models_dir)},
            "train": {**TRAIN_DEFAULTS, **(train or {})},
            "sample": {
                "prompts": ["a red circle", "a blue square on green"],
                "seeds": [0],
                "height": 64,
                "width": 64,
                "num_inference_steps": 2,
                "dtype": "float32",
                **(sample or {}),
            },
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path), path

    return make


@pytest.fixture(scope="module")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> tuple[RunConfig, StageSummary]:
    """One short distillation, 16 steps, on three shards: one holds a corrupt JPEG, one is a
    truncated tar (half its samples readable). TensorBoard logging on."""
    tmp = tmp_path_factory.mktemp("trained")
    webdataset_dir = tmp / "run" / "dataset" / "webdataset"
    webdataset_dir.mkdir(parents=True)
    write_shard(webdataset_dir / "00000.tar", 12, seed=0, corrupt_keys=("00000003",))
    write_shard(webdataset_dir / "00001.tar", 12, seed=1)
    truncated = webdataset_dir / "00002.tar"
    write_shard(truncated, 8, seed=2)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = {
        "run_dir": str(tmp / "run"),
        "demo": {"models_dir": str(models_dir)},
        "train": {
            **TRAIN_DEFAULTS,
            "max_steps": 16,
            "checkpointing_steps": 8,
            "report_to": "tensorboard",
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)

    summary = run_stage("train", StageContext(config))
    return config, summary
