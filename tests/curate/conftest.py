"""Inputs of the filter and merge stages, built here with the real formats.

``images/{shard}.tar`` in img2dataset's layout (written with webdataset's TarWriter, plus
img2dataset's ``{shard}_stats.json``) and ``captions/{shard}.parquet`` with the caption stage's
exact schema plus its done marker.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from recaption.config import RunConfig, load_config
from recaption.schemas import CAPTION_SCHEMA

PROMPT = "USER: <image>\nDescribe this image in detail. ASSISTANT:"

GOOD = [
    "A red bicycle leans against a brick wall beside a wooden door with a brass handle.",
    "Two children play with a kite on a sandy beach under a cloudy sky at sunset.",
    "A bowl of ramen with a soft boiled egg, green onions and slices of pork on a table.",
    "A snowy mountain range reflected in a calm lake surrounded by pine trees.",
    "An old lighthouse stands on a rocky cliff while waves crash against the rocks below.",
    "A tabby cat sleeps curled up on a blue knitted blanket next to a sunny window.",
]

# (caption, finish_reason, expected keep, expected reason, expected clean caption or None)
ADVERSARIAL: list[tuple[str | None, str, bool, str | None, str | None]] = [
    ("", "stop", False, "empty", None),
    ("   \n\t  ", "stop", False, "empty", None),
    ("?!... ---", "stop", False, "empty", None),
    ("A cat.", "stop", False, "too_short", None),
    ("word " * 2500, "stop", False, "repetition", None),
    ("x" * 10_000, "stop", False, "too_short", None),
    (
        "The sky is blue and wide over the field. "
        + " ".join(f"item{i} is here" for i in range(400)),
        "stop",
        False,
        "too_long",
        None,
    ),
    (
        "A garden with a tree and a bench, and a tree, and a tree, and a tree, and a tree",
        "length",
        False,
        "repetition",
        None,
    ),
    (
        "A dog sits on a red sofa in the living room. The wall behind it is painted in a pale",
        "length",
        True,
        None,
        "A dog sits on a red sofa in the living room.",
    ),
    (
        "a dog on the sofa with the wall behind it painted in a pale",
        "length",
        False,
        "truncated",
        None,
    ),
    ("I'm sorry, but I cannot see the image you are referring to.", "stop", False, "refusal", None),
    (
        "As an AI language model, I can describe the scene in general terms only.",
        "stop",
        False,
        "refusal",
        None,
    ),
    (
        "I’M SORRY, there is no image attached to this message at all.",
        "stop",
        False,
        "refusal",
        None,
    ),
    (
        "The image shows a yellow taxi driving down a busy street in the rain at night.",
        "stop",
        True,
        None,
        "A yellow taxi driving down a busy street in the rain at night.",
    ),
    (
        "In this image, there is a small boat floating on a quiet river near the old bridge.",
        "stop",
        True,
        None,
        "A small boat floating on a quiet river near the old bridge.",
    ),
    (
        "The image depicts a crowded market with fruit stalls and people walking around.",
        "stop",
        True,
        None,
        "A crowded market with fruit stalls and people walking around.",
    ),
    (
        "<p>A <b>vintage</b> car&nbsp;parked\non the\tstreet near the old town hall.</p>",
        "stop",
        True,
        None,
        "A vintage car parked on the street near the old town hall.",
    ),
    (
        "A happy dog 🐶 runs along the beach with the sea and the sunset behind it 🌅",
        "stop",
        True,
        None,
        "A happy dog 🐶 runs along the beach with the sea and the sunset behind it 🌅",
    ),
    (
        "Un chat noir est assis sur une chaise en bois près de la fenêtre ouverte.",
        "stop",
        False,
        "language",
        None,
    ),
    (
        "De kat is zwart en de hond is bruin en ze liggen samen op de bank bij het raam.",
        "stop",
        False,
        "language",
        None,
    ),
    (
        "صورة لقطة سوداء تجلس على كرسي خشبي بالقرب من النافذة المفتوحة في الصباح",
        "stop",
        False,
        "language",
        None,
    ),
    (
        "A street sign reads \u200f\u202eEXIT\u202c\u200f next to the entrance of the station.",
        "stop",
        True,
        None,
        "A street sign reads EXIT next to the entrance of the station.",
    ),
]


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small JPEG, different for every seed."""
    color = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    image = Image.new("RGB", size, color)
    image.putpixel((seed % size[0], 0), (255 - color[0], 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample(key: str, caption: str | None, **kw: Any) -> dict[str, Any]:
    """One sample of a test shard: the caption row plus what its image should be."""
    return {
        "key": key,
        "caption": caption,
        "finish_reason": kw.get("finish_reason", "stop"),
        "status": kw.get("status", "ok"),
        "original_text": kw.get("original_text", f"alt text of {key}"),
        "image": kw.get("image", True),
        "in_captions": kw.get("in_captions", True),
        "aesthetic": kw.get("aesthetic", 6.5),
    }


def write_image_shard(run_dir: Path, shard: str, samples: list[dict[str, Any]]) -> Path:
    """images/{shard}.tar (+ img2dataset's parquet and _stats.json) for the samples."""
    images = run_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    tar_path = images / f"{shard}.tar"
    rows = []
    with wds.TarWriter(str(tar_path)) as sink:
        for i, s in enumerate(samples):
            key = s["key"]
            ok = s["image"] is not False
            rows.append(
                {
                    "key": key,
                    "url": f"https://example.com/{key}.jpg",
                    "status": "success" if ok else "failed_to_download",
                }
            )
            if not ok:
                continue
            data = (
                s["image"] if isinstance(s["image"], bytes) else jpeg_bytes(int(shard) * 1000 + i)
            )
            meta = {
                "url": f"https://example.com/{key}.jpg",
                "key": key,
                "status": "success",
                "caption": s["original_text"],
                "width": 40,
                "height": 32,
                "original_width": 400,
                "original_height": 320,
                "sha256": None,
                "error_message": None,
                "WIDTH": 400,
                "HEIGHT": 320,
                "similarity": 0.31,
                "hash": 123,
                "punsafe": 0.01,
                "pwatermark": 0.1,
                "AESTHETIC_SCORE": s["aesthetic"],
            }
            sink.write({"__key__": key, "jpg": data, "txt": s["original_text"] or "", "json": meta})
    pq.write_table(pa.Table.from_pylist(rows), images / f"{shard}.parquet")
    n_ok = sum(r["status"] == "success" for r in rows)
    (images / f"{shard}_stats.json").write_text(
        json.dumps({"count": len(rows), "successes": n_ok, "failed_to_download": len(rows) - n_ok})
    )
    return tar_path


def write_caption_shard(run_dir: Path, shard: str, samples: list[dict[str, Any]]) -> Path:
    """captions/{shard}.parquet with the caption stage's schema, and its done marker."""
    captions = run_dir / "captions"
    captions.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        if not s["in_captions"]:
            continue
        ok = s["status"] == "ok"
        rows.append(
            {
                "key": s["key"],
                "caption": s["caption"] if ok else None,
                "original_text": s["original_text"],
                "model": "llava-hf/llava-1.5-7b-hf",
                "revision": "main",
                "prompt": PROMPT,
                "n_prompt_tokens": 600,
                "n_new_tokens": 40 if ok else 0,
                "finish_reason": s["finish_reason"] if ok else None,
                "status": s["status"],
                "error": None if ok else "OSError: image file is truncated",
            }
        )
    path = captions / f"{shard}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA), path)
    n_ok = sum(r["status"] == "ok" for r in rows)
    (captions / f"{shard}_stats.json").write_text(
        json.dumps({"n_input": len(rows), "n_ok": n_ok, "n_failed": len(rows) - n_ok})
    )
    return path


def write_shard(run_dir: Path, shard: str, samples: list[dict[str, Any]]) -> None:
    write_image_shard(run_dir, shard, samples)
    write_caption_shard(run_dir, shard, samples)


def standard_shards(n_shards: int = 2, per_shard: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Shards of good captions, with the adversarial ones spread over shard 00000."""
    shards: dict[str, list[dict[str, Any]]] = {}
    for s in range(n_shards):
        shard = f"{s:05d}"
        shards[shard] = [
            sample(f"{shard}{i:04d}", GOOD[(i + s) % len(GOOD)] + f" Shot number {s * 100 + i}.")
            for i in range(per_shard)
        ]
    first = shards["00000"]
    for j, (caption, finish, *_rest) in enumerate(ADVERSARIAL):
        first.append(sample(f"adv{j:03d}", caption, finish_reason=finish))
    first.append(sample("err0001", None, status="error"))
    # The same boilerplate caption on five images across two shards: a duplicate failure.
    dup = "A photo of something interesting on a white background with a shadow."
    for j in range(3):
        first.append(sample(f"dupa{j}", dup))
    if "00001" in shards:
        for j in range(2):
            shards["00001"].append(sample(f"dupb{j}", dup))
    return shards


def write_config(run_dir: Path, **sections: dict[str, Any]) -> Path:
    """A YAML run config for ``run_dir`` (CLIP and the text-token rule off unless given: the
    token rule needs the teacher's tokenizer, tested in test_text_tokens.py)."""
    data: dict[str, Any] = {"run_dir": str(run_dir), "filter": {"text_tokens": "off"}, "merge": {}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def curate() -> SimpleNamespace:
    """The input builders and hand-made captions above, for tests (conftest is not importable)."""
    return SimpleNamespace(
        ADVERSARIAL=ADVERSARIAL,
        GOOD=GOOD,
        PROMPT=PROMPT,
        CAPTION_SCHEMA=CAPTION_SCHEMA,
        jpeg_bytes=jpeg_bytes,
        sample=sample,
        write_image_shard=write_image_shard,
        write_caption_shard=write_caption_shard,
        write_shard=write_shard,
        standard_shards=standard_shards,
        write_config=write_config,
    )


@pytest.fixture
def run_inputs(tmp_path: Path) -> tuple[RunConfig, dict[str, list[dict[str, Any]]]]:
    """A run dir with two image shards and their captions; the config that points at it."""
    run_dir = tmp_path / "run"
    shards = standard_shards()
    for shard, samples in shards.items():
        write_shard(run_dir, shard, samples)
    return load_config(write_config(run_dir)), shards
