"""The demo captioner's dense training targets say what each image token shows.

The vision tower of the demo captioner is trained from random weights with per-token targets
(which shape, colour and object each token's pixels show). Wrong targets would teach it wrong
things silently, so they are checked here against the drawn pixels.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from recaption.demo.train_llava import (
    DENSE_COLOURS,
    DENSE_PARTS,
    DENSE_SHAPES,
    token_targets,
)
from recaption.demo.world import COLOURS, draw_image, object_map


@pytest.mark.parametrize("seed", range(40))
def test_the_object_map_marks_exactly_the_pixels_of_each_visible_object(seed: int) -> None:
    image, truth = draw_image(random.Random(seed))
    labels = object_map(truth)
    pixels = np.asarray(image)
    assert labels.shape == pixels.shape[:2]
    for i, obj in enumerate(truth["objects"]):
        visible = labels == i + 1
        # Every object is at least partly visible, in its own colour.
        assert visible.any()
        assert (pixels[visible] == COLOURS[obj["colour"]]).all()
    # The rest is background: it has no pixel of an object colour the background lacks
    # (objects never share a colour with the background).
    background = pixels[labels == 0].reshape(-1, 3)
    for obj in truth["objects"]:
        colour = np.array(COLOURS[obj["colour"]])
        if obj["colour"] not in truth["colour"]:
            assert not (background == colour).all(1).any()


def _groups(target: np.ndarray) -> list[np.ndarray]:
    a, b = len(DENSE_SHAPES), len(DENSE_SHAPES) + len(DENSE_COLOURS)
    return [target[:, :a], target[:, a:b], target[:, b:]]


def test_token_targets_are_shares_of_each_cell() -> None:
    rng = random.Random(3)
    for _ in range(20):
        _, truth = draw_image(rng)
        for grid in (6, 12):
            target = token_targets(truth, grid).numpy()
            assert target.shape == (grid * grid, len(DENSE_SHAPES) + len(DENSE_COLOURS) + 3)
            for group in _groups(target):
                assert np.allclose(group.sum(1), 1, atol=1e-5)
                assert (group >= 0).all()


def test_a_lone_object_fills_its_cells_and_padding_is_none() -> None:
    truth = {
        "width": 320,
        "height": 180,  # 16:9, padded to a square with bands above and below
        "background": "plain",
        "colour": "white",
        "objects": [{"shape": "star", "colour": "red", "size": "large", "position": "centre"}],
    }
    shapes, colours, parts = _groups(token_targets(truth, 6).numpy().reshape(36, -1))
    grid = shapes.reshape(6, 6, -1)
    # The top and bottom cells are padding (the image is 180 of 320 px tall): nothing there.
    assert grid[0, :, 0].min() == 1 and grid[-1, :, 0].min() == 1
    # The centre cells are the star, red, the main object.
    for cell in (14, 15, 20, 21):
        assert DENSE_SHAPES[shapes[cell].argmax()] == "star"
        assert DENSE_COLOURS[colours[cell].argmax()] == "red"
        assert DENSE_PARTS[parts[cell].argmax()] == "main"
    # No cell shows a shape or colour the image does not have.
    assert (
        shapes[:, [DENSE_SHAPES.index(s) for s in DENSE_SHAPES if s not in ("none", "star")]].max()
        == 0
    )
    assert (
        colours[
            :, [DENSE_COLOURS.index(c) for c in DENSE_COLOURS if c not in ("none", "red")]
        ].max()
        == 0
    )


def test_a_smaller_object_on_top_is_the_other_part() -> None:
    truth = {
        "width": 200,
        "height": 200,
        "background": "plain",
        "colour": "black",
        "objects": [
            {"shape": "square", "colour": "blue", "size": "large", "position": "centre"},
            {"shape": "circle", "colour": "yellow", "size": "small", "position": "bottom right"},
        ],
    }
    shapes, colours, parts = _groups(token_targets(truth, 12).numpy())
    # The circle's centre, (0.75, 0.75) of the image, is cell (9, 9) of 12x12.
    cell = 9 * 12 + 9
    assert DENSE_SHAPES[shapes[cell].argmax()] == "circle"
    assert DENSE_COLOURS[colours[cell].argmax()] == "yellow"
    assert DENSE_PARTS[parts[cell].argmax()] == "other"
    centre = 6 * 12 + 6
    assert DENSE_PARTS[parts[centre].argmax()] == "main"
    assert DENSE_SHAPES[shapes[centre].argmax()] == "square"


@pytest.mark.parametrize("kind", ["caption", "vision"])
def test_data_workers_draw_the_same_batches_in_step_order(kind: str) -> None:
    """The captioner's batches do not depend on how many processes draw them, so the shipped
    weights are reproduced with any ``workers``."""
    import torch

    from recaption.demo.train_llava import (
        StepBatches,
        build_model,
        build_tokenizer,
        step_loader,
    )

    _, processor = build_model(build_tokenizer(0))
    dataset = StepBatches(processor, kind, seed_base=5_000_000, batch_size=3, steps=5)
    inline = list(step_loader(dataset, workers=0))
    drawn_by_two = list(step_loader(dataset, workers=2))
    assert len(inline) == len(drawn_by_two) == 5
    for (batch_a, labels_a), (batch_b, labels_b) in zip(inline, drawn_by_two, strict=True):
        tensors_a = batch_a if isinstance(batch_a, dict) else {"pixel_values": batch_a}
        tensors_b = batch_b if isinstance(batch_b, dict) else {"pixel_values": batch_b}
        for name in ("pixel_values", *(("input_ids", "labels") if kind == "caption" else ())):
            assert torch.equal(tensors_a[name], tensors_b[name]), name
        assert labels_a.keys() == labels_b.keys()
        assert all(torch.equal(labels_a[k], labels_b[k]) for k in labels_a)
    # Consecutive steps draw different images.
    first = inline[0][0] if kind == "vision" else inline[0][0]["pixel_values"]
    second = inline[1][0] if kind == "vision" else inline[1][0]["pixel_values"]
    assert not torch.equal(first, second)


def test_train_models_refuses_a_device_for_a_cpu_only_trainer(tmp_path: Path) -> None:
    from recaption.demo.train_models import main

    with pytest.raises(SystemExit) as exc:
        main(["--only", "shapes-clip", "--device", "cuda", "--out", str(tmp_path), "--smoke"])
    assert exc.value.code == 2
    assert not any(tmp_path.iterdir()), "nothing is written"


@pytest.mark.parametrize(("image_size", "tower_width"), [(128, 48), (96, 32)])
def test_dense_targets_line_up_with_the_towers_tokens(image_size: int, tower_width: int) -> None:
    """Every dense layer's target grid has exactly the tokens the vision tower outputs there,
    and the processor's image tokens are the ones LLaVA's projector receives, at any size."""
    import torch

    from recaption.demo.train_llava import (
        AuxHeads,
        as_downloaded,
        build_model,
        build_tokenizer,
        fresh_batch,
    )

    model, processor = build_model(
        build_tokenizer(0), image_size=image_size, tower_width=tower_width
    )
    aux = AuxHeads(model)
    pixels, labels = fresh_batch(processor, [11, 12])
    assert pixels.shape[-2:] == (image_size, image_size)
    with torch.inference_mode():
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    for layer, grid in aux.layers.items():
        assert states[layer].shape[1] == grid * grid == labels[f"tokens_{layer}"].shape[1]
    # The prompt holds one <image> token per token of the layer LLaVA reads.
    rng = random.Random(5)
    image, _ = draw_image(rng)
    inputs = processor(
        text="USER: <image>\nhi ASSISTANT:", images=[as_downloaded(image, rng)], return_tensors="pt"
    )
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert n_image_tokens == (image_size // 16) ** 2 == states[-1].shape[1]
    with torch.inference_mode():
        assert torch.isfinite(aux.loss(labels, states[-1], states))


def test_an_image_size_the_tower_cannot_tile_is_refused() -> None:
    from recaption.demo.train_llava import build_model, build_tokenizer

    with pytest.raises(ValueError, match="multiple of 16"):
        build_model(build_tokenizer(0), image_size=100)
