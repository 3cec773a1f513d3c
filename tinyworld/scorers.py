"""The tiny world's oracle as a scorer of the product's metric interface: a judge that a config names
(``judges: ["tinyworld.scorers:Oracle"]``, ``eval/table1.py --judge tinyworld.scorers:Oracle``).

It returns 1.0 where the oracle accepts the image for its prompt, else 0.0, and sorts prompts into the grammar's
categories, so every table and summary also gets ``oracle_accuracy_<category>`` columns. It is a judge, never a
training reward: it exposes reward hacking of the learned reward.
"""

from __future__ import annotations

import numpy as np

from sd3_adrpo.metrics import Metric
from sd3_adrpo.metrics.base import as_uint8_images

from .grammar import parse
from .oracle import check


class Oracle(Metric):
    """Oracle accuracy per image (1.0 or 0.0); ``categories`` gives each prompt's grammar category."""

    key, label = "oracle_accuracy", "Oracle acc."

    def __init__(self, weights=None, device="cpu"):
        if weights is not None:
            raise ValueError("the tiny-world oracle has no weights: name it without '@...'")

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        images = as_uint8_images(images, prompts)
        self.categories(prompts)  # a prompt outside the grammar fails here, saying which
        return np.array([float(check(im, p).ok) for im, p in zip(images, prompts)])

    def categories(self, prompts: list[str]) -> list[str]:
        cats = []
        for p in prompts:
            try:
                cats.append(parse(p).category)
            except ValueError as e:
                raise ValueError(f"the tiny-world oracle judges only prompts of its grammar; {p!r}: {e}") from None
        return cats
