"""Tests of the tiny-world renderer, measured directly on pixels (independently of the oracle)."""
import numpy as np
import pytest
from PIL import Image

from tinyworld import render as render_module
from tinyworld.grammar import all_scenes, parse
from tinyworld.render import (BACKGROUND, COLOUR_JITTER, PALETTE, PlacementError, render,
                                        render_batch)


def _mask(image: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within the jitter of a palette colour (renders have no anti-aliasing)."""
    return (np.abs(image.astype(int) - PALETTE[colour]) <= COLOUR_JITTER).all(axis=2)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_render_returns_rgb_image_of_the_requested_size():
    image = render("a red circle", size=64, rng=np.random.default_rng(0))
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert render(parse("two blue squares"), size=96, rng=np.random.default_rng(0)).size == (96, 96)
    with pytest.raises(ValueError, match="at least 32"):
        render("a red circle", size=16)


def test_render_batch_is_deterministic_per_seed_and_index():
    prompts = ["a red circle", "three green triangles", "a blue square above an orange circle"]
    batch = render_batch(prompts, seed=3)
    assert batch.dtype == np.uint8 and batch.shape == (3, 64, 64, 3)
    assert np.array_equal(batch, render_batch(prompts, seed=3))
    assert not np.array_equal(batch, render_batch(prompts, seed=4))
    # image i depends on (seed, i, prompt) only, not on the other prompts of the batch
    assert np.array_equal(batch[2], render_batch(["a red square", "one red circle", prompts[2]], seed=3)[2])
    assert render_batch([], seed=0).shape == (0, 64, 64, 3)


def test_one_prompt_gives_varied_images():
    images = render_batch(["a purple triangle to the left of a yellow circle"] * 30, seed=0)
    assert len({image.tobytes() for image in images}) == 30
    centres = [np.argwhere(_mask(image, "purple")).mean(axis=0) for image in images]
    assert np.ptp(np.array(centres), axis=0).min() > 10  # positions spread in both axes


def test_only_background_and_prompted_colours_are_drawn():
    rng = np.random.default_rng(1)
    for scene in all_scenes()[::11]:
        image = np.asarray(render(scene, rng=rng))
        drawn = np.zeros(image.shape[:2], dtype=bool)
        for obj in scene.objects:
            assert _mask(image, obj.colour).any()
            drawn |= _mask(image, obj.colour)
        background = (np.abs(image.astype(int) - BACKGROUND) <= render_module.BACKGROUND_JITTER).all(axis=2)
        assert (drawn | background).all()


@pytest.mark.parametrize("text, low, high", [
    ("a red circle", 14, 24), ("an outlined blue square", 18, 24), ("one green square", 14, 22),
    ("a yellow triangle", 14, 24),
])
def test_object_sizes_stay_in_range(text, low, high):
    for image in render_batch([text] * 40, seed=5):
        width, height = _extent(_mask(image, parse(text).objects[0].colour))
        assert low <= width <= high and low <= height <= high


def test_counted_objects_are_separate_and_smaller():
    for image in render_batch(["four orange squares"] * 20, seed=6):
        mask = _mask(image, "orange")
        sides = _square_sides(mask)
        assert len(sides) == 4 and all(10 <= side <= 14 for side in sides)


def _square_sides(mask: np.ndarray) -> list[int]:
    """Sides of the filled squares in a mask, found by peeling them off one at a time."""
    mask, sides = mask.copy(), []
    while mask.any():
        y, x = np.argwhere(mask)[0]
        side = int(mask[y, x:].argmin() or mask.shape[1] - x)
        assert mask[y:y + side, x:x + side].all() and not mask[y:y + side, x + side:x + side + 3].any(), \
            "squares overlap or touch"
        mask[y:y + side, x:x + side] = False
        sides.append(side)
    return sides


@pytest.mark.parametrize("relation, axis, sign", [("left of", 1, -1), ("right of", 1, 1), ("above", 0, -1),
                                                  ("below", 0, 1)])
def test_position_relation_clearly_holds(relation, axis, sign):
    text = f"a red circle {'to the ' if 'of' in relation else ''}{relation} a blue triangle"
    for image in render_batch([text] * 50, seed=7):
        red, blue = _mask(image, "red"), _mask(image, "blue")
        offset = np.argwhere(red).mean(axis=0) - np.argwhere(blue).mean(axis=0)  # (dy, dx)
        red_side = max(_extent(red))
        assert sign * offset[axis] > red_side / 2 + 3  # the circle is clear of the triangle's centre
        assert abs(offset[1 - axis]) < sign * offset[axis]


def test_outlined_shapes_have_a_hole():
    for image in render_batch(["an outlined green circle", "an outlined green square",
                               "an outlined green triangle"] * 10, seed=8):
        mask = _mask(image, "green")
        width, height = _extent(mask)
        assert mask.sum() < 0.6 * width * height


def test_impossible_layouts_raise_a_clear_error(monkeypatch):
    monkeypatch.setitem(render_module.SIZE_RANGES, ("counting", 4), (40, 44))
    with pytest.raises(PlacementError, match="could not place 'four red circles'"):
        render("four red circles", rng=np.random.default_rng(0))
