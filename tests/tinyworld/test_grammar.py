"""Tests of the tiny-world prompt grammar and its splits."""
import hashlib
from pathlib import Path

import pytest

from tinyworld.grammar import (CATEGORIES, COLOURS, SHAPES, STYLES, Obj, Scene, all_prompts, all_scenes,
                                         heldout_pairs, parse, read_prompt_file, split_sizes, splits,
                                         uses_heldout_pair, variants, write_prompt_files)

REPO = Path(__file__).resolve().parents[2]


def _combos(scene: Scene) -> set[tuple]:
    """What the held-out rule is about: colour-shape pairs, plus the style for colour scenes."""
    if scene.category == "colour":
        return {(o.colour, o.shape, o.style) for o in scene.objects}
    return {(o.colour, o.shape) for o in scene.objects}


def test_every_prompt_round_trips_exactly():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 36 + 72 + 1080 + 180
    for text, scene in zip(prompts, all_scenes()):
        assert parse(text) == scene
        assert parse(text).to_text() == text


def test_categories_and_counts():
    scenes = all_scenes()
    counts = {c: sum(s.category == c for s in scenes) for c in CATEGORIES}
    assert counts == {"colour": 36, "counting": 72, "position": 1080, "binding": 180}
    assert parse("one red circle").category == "counting"
    assert parse("a red circle").category == "colour"


@pytest.mark.parametrize("text", [
    "a red circle", "an orange circle", "an outlined blue square", "two green triangles", "one yellow square",
    "four purple circles", "a red circle to the left of a blue square", "an orange square above a red triangle",
    "a yellow circle below a green circle", "a red circle and a blue square", "a purple triangle to the right of "
    "an orange circle",
])
def test_natural_english_prompts_parse(text):
    assert parse(text).to_text() == text


def test_parsed_structure():
    scene = parse("a red circle to the left of a blue square")
    assert scene == Scene("position", (Obj("circle", "red"), Obj("square", "blue")), "left of")
    assert parse("three green triangles").objects == (Obj("triangle", "green", 3),)
    assert parse("an outlined orange triangle").objects[0].style == "outlined"


@pytest.mark.parametrize("text, message", [
    ("a pink circle", "unknown word"),
    ("an red circle", "did you mean 'a red circle'"),
    ("a orange circle", "did you mean 'an orange circle'"),
    ("two red circle", "did you mean 'two red circles'"),
    ("one red circles", "did you mean 'one red circle'"),
    ("a red circle and a red square", "different colours"),
    ("a red circle and a blue circle", "different shapes"),
    ("a red circle above a red square", "different colours"),
    ("an outlined red circle and a blue square", "outlined"),
    ("a red circle next to a blue square", "not a tiny-world prompt"),
    ("A red circle", "not a tiny-world prompt"),
    ("five red circles", "not a tiny-world prompt"),
    ("", "not a tiny-world prompt"),
])
def test_text_outside_the_grammar_is_rejected_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_invalid_scenes_are_rejected():
    with pytest.raises(ValueError, match="count"):
        Obj("circle", "red", count=5)
    with pytest.raises(ValueError, match="relation"):
        Scene("binding", (Obj("circle", "red"), Obj("square", "blue")), "above")
    with pytest.raises(ValueError, match="counts other than 1"):
        Scene("colour", (Obj("circle", "red", count=2),))


def test_splits_are_disjoint_cover_everything_and_are_deterministic():
    parts = splits(0)
    assert parts == splits(0)
    sets = {name: set(prompts) for name, prompts in parts.items()}
    assert all(len(sets[n]) == len(parts[n]) > 0 for n in parts)
    assert not (sets["train"] & sets["tune"]) and not (sets["train"] & sets["heldout"])
    assert not (sets["tune"] & sets["heldout"])
    assert sets["train"] | sets["tune"] | sets["heldout"] == set(all_prompts())
    assert splits(1) != parts


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_heldout_combinations_never_appear_in_train_of_their_category(seed):
    parts = {name: [parse(t) for t in prompts] for name, prompts in splits(seed).items()}
    for category in CATEGORIES:
        train_combos = set().union(*(_combos(s) for s in parts["train"] if s.category == category))
        heldout = [s for s in parts["heldout"] if s.category == category]
        assert heldout, f"no held-out {category} prompts"
        for scene in heldout:
            assert _combos(scene) - train_combos, f"{scene.to_text()!r} has no combination unseen in train"
    pairs = heldout_pairs(seed)
    for scene in parts["heldout"]:
        assert uses_heldout_pair(scene, pairs) == (scene.category != "colour"), scene.to_text()
    for scene in parts["train"] + parts["tune"]:
        assert scene.category == "colour" or not uses_heldout_pair(scene, pairs), scene.to_text()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_heldout_colour_prompts_are_new_styles_of_pairs_seen_elsewhere(seed):
    parts = {name: [parse(t) for t in prompts] for name, prompts in splits(seed).items()}
    colour = [s.objects[0] for s in parts["heldout"] if s.category == "colour"]
    assert sorted(o.style for o in colour) == ["filled"] * 3 + ["outlined"] * 3
    assert len({(o.colour, o.shape) for o in colour}) == 6
    assert not {(o.colour, o.shape) for o in colour} & set(heldout_pairs(seed))
    trained_pairs = {(o.colour, o.shape) for s in parts["train"] if s.category != "colour" for o in s.objects}
    assert all((o.colour, o.shape) in trained_pairs for o in colour)


def test_heldout_pairs_are_seen_alone_in_train():
    pairs = heldout_pairs(0)
    assert len({c for c, _ in pairs}) == len({s for _, s in pairs}) == 3
    assert all(c in COLOURS and s in SHAPES for c, s in pairs)
    train = set(splits(0)["train"])
    for colour, shape in pairs:
        for style in STYLES:
            assert Scene("colour", (Obj(shape, colour, style=style),)).to_text() in train


def test_the_tune_split_is_the_one_the_rl_defaults_were_chosen_on():
    # The colour rule changed on 2026-11-28. The tune prompts must not have moved with it, or the tuning record
    # (results/tinyworld_tuning) would not be disjoint from held-out. sha256 of prompts/tinyworld_tune.txt as
    # committed before the change (git show 468059d:prompts/tinyworld_tune.txt | sha256sum).
    tune = splits(0)["tune"]
    assert hashlib.sha256("".join(t + "\n" for t in tune).encode()).hexdigest() == "a7fd9b54e17616fa959e16049b9fc6115c10dc6b95380b44d19383df4c7237e2"
    assert not set(tune) & set(splits(0)["heldout"])


def test_split_sizes_match_the_splits_and_the_docstring():
    sizes = split_sizes(0)
    assert sum(sum(s.values()) for s in sizes.values()) == len(all_prompts())
    assert sizes["position"] == {"train": 670, "tune": 74, "heldout": 336}
    assert sizes["colour"] == {"train": 27, "tune": 3, "heldout": 6}
    assert sizes["binding"] == {"train": 113, "tune": 13, "heldout": 54}
    assert sizes["counting"] == {"train": 54, "tune": 6, "heldout": 12}


def test_committed_prompt_files_match_the_splits(tmp_path):
    parts = splits(0)
    for name, prompts in parts.items():
        assert read_prompt_file(REPO / "prompts" / f"tinyworld_{name}.txt") == prompts
    written = write_prompt_files(tmp_path / "p", seed=0)
    assert [p.name for p in written] == ["tinyworld_train.txt", "tinyworld_tune.txt", "tinyworld_heldout.txt"]
    assert read_prompt_file(written[2]) == parts["heldout"]


def test_variants_differ_in_exactly_one_aspect_and_are_valid():
    for scene in all_scenes()[::7]:
        found = variants(scene)
        assert found and all(v != scene for _, v in found)
        for aspect, variant in found:
            assert parse(variant.to_text()) == variant
            if aspect == "relation":
                assert variant.objects == scene.objects
            elif aspect != "swap":
                changed = [(a, b) for a, b in zip(scene.objects, variant.objects) if a != b]
                assert len(changed) == 1 and variant.relation == scene.relation
    aspects = {a for a, _ in variants(parse("a red circle and a blue square"))}
    assert aspects == {"colour", "shape", "swap"}
    assert ("swap", parse("a blue circle and a red square")) in variants(parse("a red circle and a blue square"))
    assert {a for a, _ in variants(parse("two red circles"))} == {"colour", "shape", "count"}
