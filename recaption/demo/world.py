"""A small, realistic stand-in for LAION-aesthetics-V2 6+, drawn on the spot.

Each image shows one to three coloured shapes (circle, square, triangle, star, ...) of several
sizes, each at its own position of a 3x3 grid and the largest (the main object) drawn first,
on a plain, gradient or textured background, at varied sizes and aspect ratios.
The metadata parquet uses LAION's real column names and LAION's faults: short, noisy
alt-texts (file names, one or two words, keyword spam, empty, other languages), aesthetic
scores spread around 6 so the ``>= 6`` filter matters, plausible punsafe / pwatermark values,
and a handful of bad URLs (404, a non-image body, a truncated JPEG, a server that hangs, an
``X-Robots-Tag: noai`` header). The ground truth of every image is kept in ``truth.parquet``,
which only the caption-accuracy measurement reads.

URLs are written against the placeholder host ``DEMO_HOST``; :mod:`recaption.demo.server`
serves the world and the download stage swaps the placeholder for the server's address.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

DEMO_HOST = "http://demo.invalid"
WORLD_VERSION = 3

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ellipse")
SIZES = {"small": 0.15, "medium": 0.28, "large": 0.42}
POSITIONS = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
BACKGROUNDS = ("plain", "gradient", "texture")
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2))
FOREIGN = {
    "circle": ["cercle rouge", "roter Kreis", "círculo", "赤い丸", "круг"],
    "square": ["carré bleu", "Quadrat", "cuadrado", "四角", "квадрат"],
    "triangle": ["triangle vert", "Dreieck", "triángulo", "三角形", "треугольник"],
    "star": ["étoile jaune", "Stern", "estrella", "星", "звезда"],
    "hexagon": ["hexagone", "Sechseck", "hexágono", "六角形", "шестиугольник"],
    "ellipse": ["ellipse violette", "Ellipse", "elipse", "楕円", "эллипс"],
}
SPAM = [
    "wallpaper",
    "hd",
    "4k",
    "free",
    "download",
    "art",
    "design",
    "vector",
    "stock",
    "background",
    "abstract",
    "modern",
    "best",
    "cheap",
    "sale",
]
BAD_URL_KINDS = ("missing", "notimage", "truncated", "hang", "noai")


@dataclass(frozen=True)
class World:
    """Paths of a generated demo world."""

    root: Path

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.parquet"

    @property
    def truth(self) -> Path:
        return self.root / "truth.parquet"

    @property
    def files(self) -> Path:
        return self.root / "files"


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "hexagon":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a))
            for a in (k * math.pi / 3 for k in range(6))
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: object
) -> None:
    """Draw one ``shape`` of radius ``r`` centred on ``(cx, cy)``, filled with ``fill``."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ellipse":
        draw.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def object_map(truth: dict[str, object]) -> np.ndarray:
    """Which object each pixel of the image with ground truth ``truth`` shows.

    A ``(height, width)`` uint8 array: 0 for the background, ``i + 1`` where object ``i`` of
    ``truth["objects"]`` is visible (drawn with the same geometry and order as
    :func:`draw_image`, so a later object covers an earlier one).
    """
    w, h = int(truth["width"]), int(truth["height"])  # type: ignore[call-overload]
    labels = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(labels)
    for i, obj in enumerate(truth["objects"]):  # type: ignore[attr-defined]
        fx, fy = POSITIONS[obj["position"]]
        _draw_shape(draw, obj["shape"], fx * w, fy * h, SIZES[obj["size"]] * min(w, h), i + 1)
    return np.asarray(labels)


def _background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, dict[str, str]]:
    kind = rng.choice(BACKGROUNDS)
    c1, c2 = rng.sample(sorted(COLOURS), 2)
    if kind == "plain":
        return Image.new("RGB", (w, h), COLOURS[c1]), {"background": kind, "colour": c1}
    if kind == "gradient":
        a, b = Image.new("RGB", (w, h), COLOURS[c1]), Image.new("RGB", (w, h), COLOURS[c2])
        mask = Image.linear_gradient("L").resize((w, h))
        if rng.random() < 0.5:
            mask = mask.rotate(90, expand=False).resize((w, h))
        return Image.composite(b, a, mask), {"background": kind, "colour": f"{c1} to {c2}"}
    # Seeded from the world's own generator (PIL's effect_noise is not), so a world is the same
    # picture for picture on every machine and every run.
    gen = np.random.default_rng(rng.getrandbits(64))
    sigma = rng.uniform(30, 80)
    grain = np.clip(128 + gen.normal(0, sigma, (h, w)), 0, 255).astype(np.uint8)
    noise = Image.fromarray(grain, "L").filter(ImageFilter.GaussianBlur(1))
    tinted = Image.composite(
        Image.new("RGB", (w, h), COLOURS[c1]), Image.new("RGB", (w, h), COLOURS[c2]), noise
    )
    return tinted, {"background": kind, "colour": f"{c1} and {c2}"}


def draw_image(rng: random.Random) -> tuple[Image.Image, dict[str, object]]:
    """Draw one image and return it with its ground-truth attributes."""
    aw, ah = rng.choice(ASPECTS)
    long_side = rng.randint(160, 640)
    scale = long_side / max(aw, ah)
    w, h = max(32, int(aw * scale)), max(32, int(ah * scale))
    image, background = _background(rng, w, h)
    draw = ImageDraw.Draw(image)
    objects = []
    n_objects = rng.choice((1, 1, 1, 2, 2, 3))
    positions = rng.sample(sorted(POSITIONS), n_objects)
    sizes = sorted((rng.choice(sorted(SIZES)) for _ in range(n_objects)), key=SIZES.__getitem__)
    # Largest first, each at its own grid position: a later (smaller or equal) shape never
    # hides an earlier one completely, and the first object, the main one, is the largest.
    for size, position in zip(reversed(sizes), positions, strict=True):
        shape = rng.choice(SHAPES)
        colour = rng.choice([c for c in COLOURS if c not in background["colour"]])
        fx, fy = POSITIONS[position]
        r = SIZES[size] * min(w, h)
        cx, cy = fx * w, fy * h
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "size": size, "position": position})
    return image, {"width": w, "height": h, **background, "objects": objects}


def noisy_alt_text(rng: random.Random, index: int, truth: dict[str, object]) -> str:
    """An alt-text as LAION has them: short, noisy, sometimes empty or in another language."""
    obj = truth["objects"][0]  # type: ignore[index]
    shape, colour = obj["shape"], obj["colour"]
    kind = rng.random()
    if kind < 0.15:
        return f"{rng.choice(['IMG', 'DSC', 'image', 'photo'])}_{index:04d}.jpg"
    if kind < 0.35:
        return rng.choice([shape, f"{colour} {shape}", colour, "shapes"])
    if kind < 0.5:
        words = [colour, shape, *rng.sample(SPAM, rng.randint(5, 10))]
        rng.shuffle(words)
        return " ".join(words)
    if kind < 0.58:
        return ""
    if kind < 0.68:
        return rng.choice(FOREIGN[shape])
    return f"{colour.capitalize()} {shape} on a {truth['background']} background"


# The metadata parquet's columns: LAION's names and types.
METADATA_SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("WIDTH", pa.float64()),
        ("HEIGHT", pa.float64()),
        ("similarity", pa.float64()),
        ("hash", pa.int64()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
        ("AESTHETIC_SCORE", pa.float32()),
    ]
)


def _existing_world(world: World, stamp: dict[str, int]) -> bool:
    """Whether ``world`` is already drawn with ``stamp``; a world drawn otherwise is removed."""
    done = world.root / "world.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        return True
    if world.root.exists():
        logger.info("demo world in %s was made with other settings; redrawing it", world.root)
        shutil.rmtree(world.root)
    return False


def _bad_url_positions(rng: random.Random, n_images: int) -> dict[int, str]:
    """image index -> kind of bad URL, for a few images, every kind at least once."""
    n_bad = max(len(BAD_URL_KINDS), n_images // 40)
    return dict(
        zip(
            rng.sample(range(n_images), n_bad),
            (BAD_URL_KINDS[i % len(BAD_URL_KINDS)] for i in range(n_bad)),
            strict=True,
        )
    )


def _save_image(rng: random.Random, files: Path, i: int) -> tuple[str, bytes, dict[str, object]]:
    """Draw image ``i``, write it to ``files`` (JPEG, or PNG for one in ten).

    Returns its file name, its bytes and its ground truth.
    """
    image, truth = draw_image(rng)
    fmt = "png" if rng.random() < 0.1 else "jpg"
    name = f"{i:05d}.{fmt}"
    buf = io.BytesIO()
    image.save(buf, "PNG" if fmt == "png" else "JPEG", quality=rng.randint(80, 95))
    data = buf.getvalue()
    (files / name).write_bytes(data)
    return name, data, truth


def _add_laion_row(
    rows: dict[str, list[object]],
    rng: random.Random,
    url: str,
    alt_text: str,
    data: bytes,
    truth: dict[str, object],
) -> None:
    """Append one image's metadata row: its URL, alt-text and LAION-like sizes and scores."""
    # LAION's WIDTH/HEIGHT are the source's; a few are missing, as in the real metadata.
    rows["URL"].append(url)
    rows["TEXT"].append(alt_text)
    rows["WIDTH"].append(None if rng.random() < 0.02 else truth["width"])
    rows["HEIGHT"].append(None if rng.random() < 0.02 else truth["height"])
    rows["similarity"].append(round(rng.uniform(0.25, 0.4), 4))
    rows["hash"].append(int.from_bytes(hashlib.sha256(data).digest()[:8], "big", signed=True))
    rows["punsafe"].append(
        round(rng.betavariate(1.2, 25) if rng.random() > 0.03 else rng.uniform(0.6, 1.0), 5)
    )
    rows["pwatermark"].append(
        round(rng.betavariate(1.5, 6) if rng.random() > 0.05 else rng.uniform(0.85, 1.0), 5)
    )
    rows["AESTHETIC_SCORE"].append(round(min(7.8, max(4.5, rng.gauss(6.15, 0.35))), 4))


def _draw_world(
    tmp: Path, n_images: int, seed: int
) -> tuple[dict[str, list[object]], dict[str, list[object]]]:
    """Draw every image into ``tmp/files``; return the metadata and ground-truth columns."""
    rng = random.Random(seed)
    rows: dict[str, list[object]] = {name: [] for name in METADATA_SCHEMA.names}
    truth_rows: dict[str, list[object]] = {"URL": [], "kind": [], "attributes": []}
    bad_at = _bad_url_positions(rng, n_images)
    for i in range(n_images):
        name, data, truth = _save_image(rng, tmp / "files", i)
        kind = bad_at.get(i, "files")
        url = f"{DEMO_HOST}/{kind}/{name}"
        _add_laion_row(rows, rng, url, noisy_alt_text(rng, i, truth), data, truth)
        truth_rows["URL"].append(url)
        truth_rows["kind"].append(kind)
        truth_rows["attributes"].append(json.dumps(truth))
    return rows, truth_rows


def generate_world(root: Path, n_images: int = 400, seed: int = 0) -> World:
    """Draw the demo world into ``root`` (once; an existing complete world is reused).

    The world is written to a temporary folder and renamed into place, so an interrupted
    generation never leaves half a world behind.
    """
    world = World(Path(root))
    stamp = {"version": WORLD_VERSION, "n_images": n_images, "seed": seed}
    if _existing_world(world, stamp):
        return world
    tmp = world.root.with_name(f".{world.root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "files").mkdir(parents=True)
    rows, truth_rows = _draw_world(tmp, n_images, seed)
    pq.write_table(pa.table(rows, schema=METADATA_SCHEMA), tmp / "metadata.parquet")
    pq.write_table(pa.table(truth_rows), tmp / "truth.parquet")
    (tmp / "world.json").write_text(json.dumps(stamp))
    world.root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, world.root)
    logger.info("drew a demo world of %d images in %s", n_images, world.root)
    return world
