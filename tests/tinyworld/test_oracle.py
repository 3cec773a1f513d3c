"""Tests of the tiny-world oracle: it accepts ground-truth renders and rejects renders of other prompts."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tinyworld.grammar import CATEGORIES, OPPOSITE, Scene, all_scenes, parse, variants
from tinyworld.oracle import check, evaluate, find_blobs, segment
from tinyworld.render import BACKGROUND, PALETTE, render, render_batch

BY_CATEGORY = {c: [s for s in all_scenes() if s.category == c] for c in CATEGORIES}


def _sample(category: str, n: int, seed: int) -> list[Scene]:
    scenes = BY_CATEGORY[category]
    return [scenes[i] for i in np.random.default_rng(seed).integers(len(scenes), size=n)]


@pytest.mark.parametrize("category", CATEGORIES)
def test_accepts_ground_truth_renders_in_every_category(category):
    scenes = _sample(category, 1000, seed=100 + CATEGORIES.index(category))
    report = evaluate(render_batch(scenes, seed=12345), scenes)
    assert report["n_per_category"] == {category: 1000}
    assert report["per_category"][category] >= 0.99, report


def _rejection_rate(aspect: str, category: str, n: int, seed: int, pick=None) -> float:
    """Render a one-attribute variant of each sampled scene and check it against the original."""
    rng = np.random.default_rng(seed)
    rejected = []
    for scene in _sample(category, n, seed):
        candidates = [v for a, v in variants(scene) if a == aspect and (pick is None or pick(scene, v))]
        wrong = candidates[rng.integers(len(candidates))]
        rejected.append(not check(render(wrong, rng=rng), scene).ok)
    return float(np.mean(rejected))


@pytest.mark.parametrize("aspect, category", [
    ("colour", "colour"), ("colour", "counting"), ("colour", "position"), ("colour", "binding"),
    ("shape", "colour"), ("shape", "counting"), ("shape", "position"), ("shape", "binding"),
    ("style", "colour"), ("count", "counting"), ("relation", "position"), ("swap", "binding"),
])
def test_rejects_one_attribute_changes(aspect, category):
    assert _rejection_rate(aspect, category, 150, seed=7) >= 0.95


def test_rejects_swapped_positions():
    def swapped(scene, variant):
        return variant.relation == OPPOSITE[scene.relation]
    assert _rejection_rate("relation", "position", 300, seed=8, pick=swapped) >= 0.95


def test_rejects_counts_off_by_one():
    def off_by_one(scene, variant):
        return abs(variant.objects[0].count - scene.objects[0].count) == 1
    assert _rejection_rate("count", "counting", 300, seed=9, pick=off_by_one) >= 0.95


def test_extra_object_of_another_colour_fails_and_specks_are_ignored():
    image = render("a red circle and a blue square", rng=np.random.default_rng(0))
    result = check(image, "a red circle")
    assert not result.ok and not result.colour_ok and "blue" in result.reason
    clean = render("a red circle", rng=np.random.default_rng(1))
    speckled = clean.copy()
    ImageDraw.Draw(speckled).rectangle((0, 0, 1, 1), fill=PALETTE["blue"])  # a 2x2 speck
    assert check(speckled, "a red circle").ok


def test_result_details_name_the_failing_aspect():
    scene = parse("a red circle to the left of a blue square")
    result = check(render("a red circle to the right of a blue square", rng=np.random.default_rng(2)), scene)
    assert (result.colour_ok, result.count_ok, result.shape_ok, result.position_ok) == (True, True, True, False)
    result = check(render("three green triangles", rng=np.random.default_rng(3)), "two green triangles")
    assert not result.count_ok and result.shape_ok and result.position_ok is None
    result = check(render("a green square", rng=np.random.default_rng(4)), "a green circle")
    assert not result.shape_ok and result.count_ok and "circle" in result.reason
    assert check(render("a green circle", rng=np.random.default_rng(4)), "a green circle").reason == ""


def test_segment_counts_pixels_at_least_half_way_from_background_to_a_colour():
    background, red = np.array(BACKGROUND, float), np.array(PALETTE["red"], float)
    mixes = [np.round(background + a * (red - background)) for a in (0.2, 0.45, 0.55, 0.8, 1.0)]
    pixels = np.array([mixes + [np.array([0.0, 0.0, 0.0]), np.array(PALETTE["blue"], float)]], dtype=np.uint8)
    red_index, blue_index = list(PALETTE).index("red"), list(PALETTE).index("blue")
    assert segment(pixels).tolist() == [[-1, -1, red_index, red_index, red_index, -1, blue_index]]


def test_blobs_are_8_connected():
    image = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    for i in range(30):  # a one-pixel diagonal line: one blob, not 30 specks
        image[10 + i, 5 + i] = PALETTE["red"]
    (blob,) = find_blobs(image)
    assert blob.area == 30 and blob.bbox == (5, 10, 34, 39)


def test_blank_image_fails_every_category():
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert find_blobs(blank) == []
    for category in CATEGORIES:
        assert not check(blank, BY_CATEGORY[category][0]).ok


@pytest.mark.parametrize("size", [32, 48, 96, 128])
def test_accepts_pil_images_of_other_square_sizes(size):
    rng = np.random.default_rng(size)
    scenes = [all_scenes()[i] for i in rng.integers(len(all_scenes()), size=100)]
    images = [render(s, size=size, rng=rng) for s in scenes]
    assert evaluate(images, scenes)["accuracy"] >= 0.99


def test_tolerates_mild_blur_of_filled_shapes():
    """Decoded images have soft edges; the half-way segmentation keeps blurred blobs' shapes."""
    scenes = [s for s in all_scenes() if all(o.style == "filled" for o in s.objects)][::3]
    images = [Image.fromarray(x).filter(ImageFilter.GaussianBlur(0.8)) for x in render_batch(scenes, seed=1)]
    assert evaluate(images, scenes)["accuracy"] >= 0.98


def test_rejects_bad_inputs_with_instructions():
    with pytest.raises(ValueError, match="uint8"):
        check(np.zeros((64, 64, 3), dtype=np.float32), "a red circle")
    with pytest.raises(ValueError, match="square"):
        check(np.zeros((64, 48, 3), dtype=np.uint8), "a red circle")
    with pytest.raises(ValueError, match="one prompt per image"):
        evaluate(np.zeros((2, 64, 64, 3), dtype=np.uint8), ["a red circle"])


def test_evaluate_reports_overall_per_category_and_per_aspect():
    prompts = ["a red circle", "two blue squares", "a red circle above a blue square",
               "a red circle and a blue square"]
    images = render_batch(prompts[:3] + ["a blue circle and a red square"], seed=0)
    report = evaluate(images, prompts)
    assert report["accuracy"] == 0.75 and report["n"] == 4
    assert report["per_category"] == {"colour": 1.0, "counting": 1.0, "position": 1.0, "binding": 0.0}
    assert report["per_aspect"]["position"] == 1.0 and report["per_aspect"]["shape"] == 0.75


def test_evaluate_reports_counting_by_number_of_objects():
    # renders of 1, 2, 2 and 3 objects, checked against prompts asking for 1, 2, 3 and 3: only the 1 and 2 asks
    # and the last are right; colour prompts do not enter the breakdown
    drawn = ["one red circle", "two blue squares", "two green triangles", "three red squares", "a red circle"]
    asked = ["one red circle", "two blue squares", "three green triangles", "three red squares", "a red circle"]
    report = evaluate(render_batch(drawn, seed=5), asked)
    assert report["per_count"] == {"1": 1.0, "2": 1.0, "3": 0.5}
    assert report["n_per_count"] == {"1": 1, "2": 1, "3": 2}
