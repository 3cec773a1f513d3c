"""Pictures a person reads: tiles captioned with their full prompt and score, base and trained side by side, and
grid prompts that show every category of the held-out set."""

from pathlib import Path

import numpy as np

from sd3_adrpo.io import captioned_grid, side_by_side
from sd3_adrpo.prompts import balanced_subset, seeded_subset

ROOT = Path(__file__).resolve().parents[1]


def _solid(*colours):
    return np.stack([np.full((8, 8, 3), c, np.uint8) for c in colours])


def test_captioned_tiles_are_scaled_placed_and_captioned_in_full():
    images = _solid((255, 0, 0), (0, 255, 0), (0, 0, 255))
    grid = captioned_grid(images, ["a red circle\nreward 1.00", "g", "b"], ncols=2)
    pad, tile = 4, 128
    assert grid.shape[1] == 2 * (tile + pad) + pad
    assert (grid[pad : pad + tile, pad : pad + tile] == (255, 0, 0)).all()  # 8 px upscaled to a 128 px tile
    assert (grid[pad : pad + tile, 2 * pad + tile : 2 * pad + 2 * tile] == (0, 255, 0)).all()
    caption = grid[pad + tile : pad + tile + 40, pad : pad + tile]
    assert (caption.max(axis=2) < 100).any() and (caption == 255).any()  # dark text on white under the tile
    # a long prompt is wrapped, never cut: each extra line makes every cell taller
    words = "a purple square to the left of an orange circle and a yellow triangle below a blue square " * 2
    taller = captioned_grid(images, [words, "g", "b"], ncols=2)
    assert taller.shape[0] >= grid.shape[0] + 2 * 5 * 14  # two rows of cells, at least 5 more lines of 14 px each


def test_base_and_trained_side_by_side_in_one_image():
    left, right = np.zeros((50, 60, 3), np.uint8), np.full((40, 30, 3), 200, np.uint8)
    both = side_by_side({"Base": left, "Trained (iteration 60)": right}, gap=12)
    head = both.shape[0] - 50
    assert both.shape[1] == 60 + 12 + 30 and head > 10
    assert (both[head:, :60] == 0).all() and (both[head : head + 40, 72:] == 200).all()
    assert (both[:head, :60].max(axis=2) < 100).any()  # the title is written above its panel


def test_balanced_subset_shows_every_category():
    categories = ["position"] * 41 + ["colour"] * 3 + ["counting"] * 3 + ["binding"] * 3  # 82% position, as held out
    prompts = [f"p{i}" for i in range(len(categories))]
    chosen = balanced_subset(prompts, categories, 4, seed=0)
    assert sorted(categories[prompts.index(p)] for p in chosen) == ["binding", "colour", "counting", "position"]
    assert chosen == sorted(chosen, key=prompts.index)  # in file order
    assert chosen == balanced_subset(prompts, categories, 4, seed=0) != balanced_subset(prompts, categories, 4, seed=1)
    six = balanced_subset(prompts, categories, 6, seed=0)
    counts = {c: sum(categories[prompts.index(p)] == c for p in six) for c in set(categories)}
    assert counts == {"binding": 2, "colour": 2, "counting": 1, "position": 1}  # one of each in turn, then again
    assert balanced_subset(prompts, None, 4, seed=3) == seeded_subset(prompts, 4, 3)  # no categories: a random subset
    assert len(balanced_subset(prompts[:2], categories[:2], 4, seed=0)) == 2


def test_the_periodic_grid_prompts_cover_the_tiny_worlds_categories(monkeypatch):
    from sd3_adrpo.config import parse_args
    from sd3_adrpo.grids import select_grid_prompts
    from tinyworld.scorers import Oracle

    monkeypatch.chdir(ROOT)
    cfg = parse_args(["--config", "configs/tiny.yaml"])  # judged by the oracle, 4 grid prompts of the held-out set
    prompts = select_grid_prompts(cfg)
    assert len(prompts) == 4 and set(prompts) <= set(Path(cfg.eval_prompts).read_text().splitlines())
    assert len(set(Oracle().categories(prompts))) == 4  # the first four held-out prompts were all of one category
    cfg.judges = []
    assert select_grid_prompts(cfg) == seeded_subset(Path(cfg.eval_prompts).read_text().splitlines(), 4, cfg.seed)


def test_a_judge_written_as_a_yaml_mapping_sorts_prompts_as_its_short_form_does():
    from sd3_adrpo.grids import prompt_categories
    from tinyworld.scorers import Oracle

    prompts = ["a red circle", "two blue squares", "a red circle to the left of a blue square"]
    expected = Oracle().categories(prompts)
    assert prompt_categories(["tinyworld.scorers:Oracle"], prompts) == expected
    assert prompt_categories(["{tinyworld.scorers:Oracle: {}}"], prompts) == expected
    assert prompt_categories(["clip_score"], prompts) is None  # a judge without categories sorts nothing
