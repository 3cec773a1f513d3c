import numpy as np
import pytest

from sd3_adrpo.metrics import build_metric
from tinyworld.render import BACKGROUND, render_batch


def test_oracle_judge_accepts_a_true_render_and_rejects_a_blank_image():
    oracle = build_metric("tinyworld.scorers:Oracle")  # as a config names it
    prompts = ["a red circle", "two blue squares", "a red circle"]
    true = render_batch(prompts[:2], seed=0)
    blank = np.full_like(true[0], BACKGROUND)
    scores = oracle(np.concatenate([true, blank[None]]), prompts)
    assert scores.tolist() == [1.0, 1.0, 0.0]
    assert oracle.column == "oracle_accuracy" and oracle.categories(prompts) == ["colour", "counting", "colour"]


def test_oracle_judge_refuses_prompts_outside_its_grammar_and_weights():
    oracle = build_metric("tinyworld.scorers:Oracle")
    with pytest.raises(ValueError, match="only prompts of its grammar .*; 'an astronaut riding a horse'"):
        oracle.categories(["a red circle", "an astronaut riding a horse"])
    with pytest.raises(ValueError, match="has no weights"):
        build_metric("tinyworld.scorers:Oracle", "some/weights")


def test_oracle_reads_what_to_verify_from_geneval_style_metadata():
    from tinyworld.grammar import parse
    from tinyworld.scorers import geneval_metadata, scene_from_metadata

    meta = {"tag": "counting", "include": [{"class": "square", "color": "blue", "count": 2}]}
    assert scene_from_metadata(meta) == parse("two blue squares") and geneval_metadata(parse("two blue squares")) == meta
    image = render_batch(["two blue squares"], seed=1)
    oracle = build_metric("tinyworld.scorers:Oracle")
    # any wording: the metadata says what must be there (the prompt text alone is outside the grammar)
    assert oracle(image, ["a photo of a pair of blue squares"], metadata=[meta]).tolist() == [1.0]
    wrong = {"tag": "counting", "include": [{"class": "square", "color": "blue", "count": 3}]}
    assert oracle(image, ["a photo of three blue squares"], metadata=[wrong]).tolist() == [0.0]
    # partial credit: the colour, shape and style checks pass, the count does not
    partial = build_metric("tinyworld.scorers:Oracle", partial=True)
    assert partial(image, ["three blue squares"], metadata=[wrong]).tolist() == [0.75]
    with pytest.raises(ValueError, match="needs tag and include"):
        oracle(image, ["x"], metadata=[{"include": [{"class": "square"}]}])
