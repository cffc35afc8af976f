"""Caption accuracy against the demo world's ground truth: parsing, scoring, the dataset's numbers.

Hand-made captions pin the parser's rules (synonyms, plurals, negation, colour binding per
object, background phrases, counts); every caption :func:`describe` writes must parse back
with every attribute it states right and nothing false; a small demo run's ``stats.json``,
card and report show the table.
"""

from __future__ import annotations

import html
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption import stages
from recaption.caption_accuracy import (
    ATTRIBUTES,
    DEMO_VOCABULARY,
    FALSE_STATEMENTS,
    CaptionClaims,
    ObjectClaim,
    Vocabulary,
    accuracy_rows,
    accuracy_table,
    load_truth,
    match_truth,
    parse_caption,
    score_caption,
)
from recaption.config import load_config
from recaption.dataset_stats import collect_dataset_stats
from recaption.demo.describe import describe
from recaption.demo.world import draw_image
from recaption.stages import StageContext


def obj(shape: str, colour: str, size: str = "large", position: str = "centre") -> dict[str, str]:
    return {"shape": shape, "colour": colour, "size": size, "position": position}


def truth(*objects: dict[str, str], background: str = "plain", colour: str = "blue") -> dict:
    return {
        "width": 100,
        "height": 100,
        "background": background,
        "colour": colour,
        "objects": list(objects),
    }


RED_CIRCLE = truth(obj("circle", "red"), obj("square", "green", "small", "top left"))


def score(text: str | None, t: dict[str, Any] = RED_CIRCLE) -> dict[str, bool | None]:
    return score_caption(parse_caption(text), t)


# -- parsing -------------------------------------------------------------------------------------


def test_a_full_caption_binds_every_attribute_to_its_object():
    claims = parse_caption(
        "A large red circle in the centre and a small green square in the upper left, "
        "on a plain blue background."
    )
    assert claims.objects == (
        ObjectClaim("circle", "red", "large", "centre"),
        ObjectClaim("square", "green", "small", "top left"),
    )
    assert claims.background_colours == {"blue"}
    assert claims.unbound_colours == frozenset() and claims.count is None
    s = score(
        "A large red circle in the centre and a small green square in the upper left, "
        "on a plain blue background."
    )
    assert all(s[name] for name in ATTRIBUTES)
    assert not any(s[name] for name in FALSE_STATEMENTS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("two CIRCLES", ObjectClaim("circle")),
        ("three purple hexagons", ObjectClaim("hexagon", "purple")),
        ("ellipses and ovals", ObjectClaim("ellipse")),
        ("many stars!", ObjectClaim("star")),
        ("some triangles", ObjectClaim("triangle")),
        ("a violet square", ObjectClaim("square")),  # violet is not purple
        ("a grey star", ObjectClaim("star")),  # grey is no colour of the world
        ("a medium-sized orange oval", ObjectClaim("ellipse", "orange", "medium")),
    ],
)
def test_synonyms_and_plurals(text, expected):
    assert parse_caption(text).objects[0] == expected


def test_only_listed_synonyms_count():
    purple_circle = truth(obj("circle", "purple"))
    violet = score("A violet circle on a blue background.", purple_circle)
    assert violet["main_shape"] is True
    assert violet["main_colour"] is None and violet["main_shape_colour"] is None
    assert violet["false_colour"] is False  # the background is right, nothing false
    with_violet = Vocabulary(
        colours={**DEMO_VOCABULARY.colours, "violet": "purple"},
        shapes=DEMO_VOCABULARY.shapes,
        sizes=DEMO_VOCABULARY.sizes,
        positions=DEMO_VOCABULARY.positions,
        counts=DEMO_VOCABULARY.counts,
    )
    claims = parse_caption("A violet circle.", with_violet)
    assert claims.objects == (ObjectClaim("circle", "purple"),)
    assert score_caption(claims, purple_circle)["main_shape_colour"] is True


@pytest.mark.parametrize(
    ("phrase", "position"),
    [
        ("in the centre", "centre"),
        ("in the center", "centre"),
        ("in the middle", "centre"),
        ("in the top left corner", "top left"),
        ("at the upper left", "top left"),
        ("in the lower right", "bottom right"),
        ("at the top centre", "top"),
        ("near the bottom", "bottom"),
        ("at the left side", "left"),
        ("on the right", "right"),
        ("at the Top-Right", "top right"),
    ],
)
def test_position_phrases(phrase, position):
    claims = parse_caption(f"A red circle {phrase} on a white background.")
    assert claims.objects == (ObjectClaim("circle", "red", None, position),)


def test_center_and_centre_score_the_same():
    assert score("a red circle in the center")["position"] is True
    assert score("a red circle in the centre")["position"] is True
    assert score("a red circle on the left")["position"] is False


@pytest.mark.parametrize(
    "text",
    [
        "There is no red circle.",
        "This is not a red circle.",
        "A picture without any red circles or green squares.",
        "Neither a red circle nor a green square.",
        "The circle isn't red",
    ],
)
def test_negated_mentions_state_nothing(text):
    claims = parse_caption(text)
    assert all(c.colour != "red" for c in claims.objects)
    assert not any(c.shape == "square" for c in claims.objects)
    assert "red" not in claims.unbound_colours and "red" not in claims.background_colours


def test_negation_ends_with_its_phrase():
    claims = parse_caption("No blue star, but a red circle in the centre and not a hexagon.")
    assert claims.objects == (ObjectClaim("circle", "red", None, "centre"),)
    s = score("No blue star, but a red circle in the centre and not a hexagon.")
    assert s["main_shape_colour"] is True and s["hallucination"] is False


def test_two_objects_keep_their_own_colours():
    t = truth(obj("circle", "red"), obj("square", "green", "small", "top left"))
    right = score("a red circle and a green square", t)
    assert right["main_shape_colour"] is True and right["false_colour"] is False
    assert right["count"] is True  # two object claims, two objects
    swapped = score("a green circle and a red square", t)
    assert swapped["main_shape_colour"] is False
    assert swapped["main_colour"] is True  # red is named, on the wrong shape
    assert swapped["false_colour"] is True and swapped["false_shape"] is False
    assert swapped["hallucination"] is True
    both = parse_caption("red and green circles")
    assert both.objects == (ObjectClaim("circle", "red"), ObjectClaim("circle", "green"))
    predicate = parse_caption("The circle is red and the square is green.")
    assert predicate.objects == (ObjectClaim("circle", "red"), ObjectClaim("square", "green"))


def test_the_right_colour_on_the_wrong_shape_is_false():
    t = truth(obj("circle", "red"))
    s = score("A red square on a blue background.", t)
    assert s["main_shape"] is False and s["main_shape_colour"] is False
    assert s["main_colour"] is True
    assert s["false_colour"] is True and s["false_shape"] is True and s["hallucination"] is True
    assert s["background_colour"] is True


def test_a_caption_in_another_language_states_nothing():
    for text in ("赤い丸", "roter Kreis", "круг", "círculo rojo", "", None, "IMG_0042.jpg"):
        claims = parse_caption(text)
        assert claims == CaptionClaims(), text
        assert set(score(text).values()) == {None}, text
    table = accuracy_table([("赤い丸", RED_CIRCLE)])
    assert table["n"] == 1
    assert all(v == {"right": 0.0, "false": 0.0} for v in table["attributes"].values())
    assert all(v == 0.0 for v in table["false_statements"].values())


@pytest.mark.parametrize(
    ("text", "colours"),
    [
        ("a red circle on a plain blue background", {"blue"}),
        ("a red circle on a solid blue background", {"blue"}),
        ("a red circle on a blue to white gradient background", {"blue", "white"}),
        ("a red circle on a gradient background from blue to white", {"blue", "white"}),
        ("a red circle on a background that fades from purple to white", {"purple", "white"}),
        ("a red circle on a grainy blue and black background", {"blue", "black"}),
        ("a red circle on a textured blue and black background", {"blue", "black"}),
        ("a red circle on a noisy background of blue and black", {"blue", "black"}),
        ("A red circle. The background is blue.", {"blue"}),
        ("Against a blue background, there is a red circle.", {"blue"}),
        ("The background is blue and the circle is red", {"blue"}),
    ],
)
def test_background_phrases(text, colours):
    claims = parse_caption(text)
    assert claims.background_colours == colours
    assert claims.objects == (ObjectClaim("circle", "red"),)
    assert claims.unbound_colours == frozenset()


def test_background_colours_are_scored_as_a_set():
    gradient = truth(obj("circle", "red"), background="gradient", colour="purple to white")
    assert score("on a purple to white gradient background", gradient)["background_colour"]
    half = score("a red circle on a purple background", gradient)
    assert half["background_colour"] is False and half["false_colour"] is False
    wrong = score("a red circle on a green background", gradient)
    assert wrong["background_colour"] is False and wrong["false_colour"] is True
    assert wrong["main_shape_colour"] is True


def test_loose_colours_bind_to_nothing():
    claims = parse_caption("red, beautiful. A shape in green")
    assert claims.objects == () and claims.unbound_colours == {"red", "green"}
    s = score("red", RED_CIRCLE)
    assert s["main_colour"] is True and s["main_shape"] is None and s["false_colour"] is None
    spam = parse_caption("wallpaper white download sale stock hd background star 4k")
    assert spam.objects == (ObjectClaim("star", "white"),) and not spam.background_colours


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("The image shows two shapes: a red circle and a green square.", 2),
        ("A simple picture of one shape. It shows a red circle.", 1),
        ("Three colourful shapes on a blue background.", 3),
        ("a single red circle", 1),
        ("2 objects", 2),
        ("one red circle", None),
        ("one of the shapes is red", None),
        ("no shapes at all", None),
    ],
)
def test_count_words(text, count):
    assert parse_caption(text).count == count


def test_count_scoring():
    assert score("Two shapes: a red circle and a green square.")["count"] is True
    assert score("Three shapes: a red circle and a green square.")["count"] is False
    assert score("a red circle")["count"] is None  # one claim states no count
    assert score("a red circle and a green square")["count"] is True
    assert score("a red circle, a green square and a blue star")["count"] is False


# -- aggregate -----------------------------------------------------------------------------------


def test_accuracy_table_aggregates_over_all_captions():
    rows = [
        ("A red circle in the centre on a blue background. Two shapes.", RED_CIRCLE),
        ("A red square on a blue background.", RED_CIRCLE),
        ("赤い丸", RED_CIRCLE),
        (None, RED_CIRCLE),
    ]
    table = accuracy_table(rows)
    assert table["n"] == 4
    attrs = table["attributes"]
    assert attrs["main_shape"] == {"right": 0.25, "false": 0.25}
    assert attrs["main_colour"] == {"right": 0.5, "false": 0.0}
    assert attrs["main_shape_colour"] == {"right": 0.25, "false": 0.25}
    assert attrs["background_colour"] == {"right": 0.5, "false": 0.0}
    assert attrs["position"] == {"right": 0.25, "false": 0.0}
    assert attrs["count"] == {"right": 0.25, "false": 0.0}
    assert table["false_statements"] == {
        "false_colour": 0.25,
        "false_shape": 0.0,  # the image has a (green) square
        "hallucination": 0.25,
    }
    assert json.loads(json.dumps(table)) == table
    assert accuracy_table([])["attributes"]["main_shape"] == {"right": None, "false": None}
    rows_out = accuracy_rows({"synthetic": table, "alt_text": accuracy_table([])})
    assert len(rows_out) == len(ATTRIBUTES) + len(FALSE_STATEMENTS)
    assert rows_out[0] == ["main object's shape", "25.0%", "25.0%", "-", "-"]
    assert rows_out[-1] == ["names a false colour or shape", "-", "25.0%", "-", "-"]


def test_every_described_caption_parses_back_right():
    """The parser and the describer agree: 300 world images, every caption fully right."""
    rng = random.Random(20240611)
    rows = []
    for _ in range(300):
        _, t = draw_image(rng)
        text = describe(t, rng)
        s = score_caption(parse_caption(text), t)
        for name in ("main_shape", "main_colour", "main_shape_colour", "background_colour"):
            assert s[name] is True, (name, text, t)
        assert s["position"] in (True, None) and s["count"] in (True, None), (text, t, s)
        assert not any(s[name] for name in FALSE_STATEMENTS), (text, t, s)
        claims = parse_caption(text)
        assert len(claims.objects) == len(t["objects"]), (text, t)
        if any(c.position for c in claims.objects):
            assert s["position"] is True
            assert [c.position for c in claims.objects] == [o["position"] for o in t["objects"]]
        rows.append((text, t))
    table = accuracy_table(rows)
    assert all(table["attributes"][n]["false"] == 0.0 for n in ATTRIBUTES)
    assert set(table["false_statements"].values()) == {0.0}


# -- ground truth and the dataset's numbers ------------------------------------------------------


def write_truth(path: Path, rows: dict[str, dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "URL": list(rows),
            "kind": ["files"] * len(rows),
            "attributes": [json.dumps(t) for t in rows.values()],
        }
    )
    pq.write_table(table, path)
    return path


def test_load_and_match_truth(tmp_path):
    path = write_truth(
        tmp_path / "truth.parquet",
        {"http://demo.invalid/files/00001.jpg": RED_CIRCLE, "http://demo.invalid/x.png": {}},
    )
    truth_rows = load_truth(path)
    assert truth_rows["http://demo.invalid/files/00001.jpg"] == RED_CIRCLE
    matched = match_truth(
        [
            "http://demo.invalid/files/00001.jpg",
            "http://127.0.0.1:41234/files/00001.jpg",  # the demo server's address
            "http://127.0.0.1:41234/files/00002.jpg",
            None,
        ],
        truth_rows,
    )
    assert matched == [RED_CIRCLE, RED_CIRCLE, None, None]


def _finish(config):
    for name in ("filter", "merge"):
        summary = stages.run(name, StageContext(config))
        assert summary.ok, summary.describe()


def test_demo_run_stats_card_and_report_show_caption_accuracy(tmp_path, curate):
    run_dir = tmp_path / "run"
    rng = random.Random(5)
    samples, truth_rows = [], {}
    for i in range(5):
        _, t = draw_image(rng)
        key = f"00000{i:04d}"
        alt = "赤い丸" if i == 0 else f"{t['objects'][0]['shape']} wallpaper"
        samples.append(curate.sample(key, describe(t, rng), original_text=alt))
        # The truth has the world's placeholder host; merged URLs have the server's.
        truth_rows[f"http://demo.invalid/{key}.jpg"] = t
    samples.append(curate.sample("000000099", curate.GOOD[0], original_text="a bicycle"))
    curate.write_shard(run_dir, "00000", samples)
    config = load_config(curate.write_config(run_dir, demo={"enabled": True}))
    write_truth(config.demo_world_dir / "truth.parquet", truth_rows)
    _finish(config)

    stats = json.loads((config.dataset_dir / "stats.json").read_text())
    accuracy = stats["caption_accuracy"]
    assert accuracy["n"] == 5 and accuracy["n_without_truth"] == 1
    assert accuracy["truth"] == str(config.demo_world_dir / "truth.parquet")
    synthetic, alt_text = accuracy["synthetic"], accuracy["alt_text"]
    assert synthetic["n"] == alt_text["n"] == 5
    assert synthetic["attributes"]["main_shape_colour"] == {"right": 1.0, "false": 0.0}
    assert synthetic["false_statements"]["hallucination"] == 0.0
    assert alt_text["attributes"]["main_shape"] == {"right": 0.8, "false": 0.0}
    assert alt_text["attributes"]["main_colour"] == {"right": 0.0, "false": 0.0}

    card = (config.dataset_dir / "README.md").read_text()
    assert "## Caption accuracy against ground truth" in card
    assert "| main object's shape | 100.0% | 0.0% | 80.0% | 0.0% |" in card
    page = (config.dataset_dir / "report" / "index.html").read_text()
    assert "<h2>Caption accuracy against ground truth</h2>" in page
    assert page.index("Caption accuracy against ground truth") < page.index("<h2>Examples")
    label = html.escape("main object's shape")
    assert f'<th class="label">{label}</th>' in page
    assert "<td>80.0%</td>" in page


def test_no_caption_accuracy_outside_the_demo_or_from_a_broken_truth(run_inputs, curate, caplog):
    config, _ = run_inputs
    truth_path = write_truth(
        config.demo_world_dir / "truth.parquet", {"https://example.com/x.jpg": RED_CIRCLE}
    )
    _finish(config)
    stats = json.loads((config.dataset_dir / "stats.json").read_text())
    assert "caption_accuracy" not in stats
    assert "Caption accuracy" not in (config.dataset_dir / "README.md").read_text()

    demo = load_config(curate.write_config(config.run_dir, demo={"enabled": True}))
    accuracy = collect_dataset_stats(demo, stats["shards"])["caption_accuracy"]
    assert accuracy["n"] == 0 and accuracy["n_without_truth"] == stats["n_samples"] > 0
    assert accuracy["synthetic"]["attributes"]["main_shape"] == {"right": None, "false": None}
    truth_path.write_bytes(b"not a parquet file")
    assert "caption_accuracy" not in collect_dataset_stats(demo, stats["shards"])
    assert any("caption accuracy left out" in r.getMessage() for r in caplog.records)
