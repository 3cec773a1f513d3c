"""Ground-truth renderer of the tiny world: many different images for one prompt.

Objects are flat, axis-aligned, upright shapes on a light-grey background, drawn without anti-aliasing so
every pixel is a (jittered) palette colour; the oracle (`oracle.py`) relies on these facts. Geometry is
specified at 64 px and scaled to the requested size. Variation per image: object sizes, positions, and a
small colour jitter. Objects never overlap (bounding boxes keep a gap), and position scenes separate the two
objects along the relation axis by more than their mean size, with the perpendicular offset at most
`PERPENDICULAR_RATIO` of that, so the relation holds clearly and no other relation does.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .grammar import Obj, Scene, parse

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 220, 20),
    "purple": (145, 55, 190),
    "orange": (245, 125, 15),
}
BACKGROUND = (240, 240, 240)
COLOUR_JITTER = 10  # max per-channel offset of an object's colour (palette colours are >= 95 apart)
BACKGROUND_JITTER = 5
REFERENCE_SIZE = 64  # all lengths below are in pixels at this image size
# Object side length ranges (inclusive, at 64 px): (category, count) -> (low, high).
SIZE_RANGES: dict[tuple[str, int], tuple[int, int]] = {
    ("colour", 1): (14, 24),
    ("counting", 1): (14, 22),
    ("counting", 2): (12, 18),
    ("counting", 3): (10, 14),
    ("counting", 4): (10, 14),
    ("position", 1): (12, 20),
    ("binding", 1): (12, 20),
}
OUTLINED_SIZE_RANGE = (18, 24)  # outlines need room for a visible hole
BORDER = 2  # free margin at the image edge
GAP = 3  # minimum free space between the bounding boxes of two objects
PERPENDICULAR_RATIO = 0.4
MAX_TRIES = 2000

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


class PlacementError(RuntimeError):
    """No non-overlapping layout satisfying the scene was found."""


def _scale(length: float, size: int) -> int:
    return max(1, round(length * size / REFERENCE_SIZE))


def _side_range(scene: Scene, obj: Obj) -> tuple[int, int]:
    if obj.style == "outlined":
        return OUTLINED_SIZE_RANGE
    return SIZE_RANGES[(scene.category, obj.count)]


def _relation_holds(a: Box, b: Box, relation: str, gap: int) -> bool:
    """Whether box `a` is clearly `relation` box `b` (centre offset along the axis > mean side + gap)."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    if relation in ("left of", "above"):
        along = -along
    mean_side = (a[2] - a[0] + b[2] - b[0] + 2) / 2
    return along >= mean_side + gap and abs(across) <= PERPENDICULAR_RATIO * along


def _apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _layout(scene: Scene, size: int, rng: np.random.Generator) -> list[tuple[Obj, Box]]:
    """Sample object sides and positions by rejection until nothing overlaps and the relation holds."""
    border, gap = _scale(BORDER, size), _scale(GAP, size)
    kinds = [obj for obj in scene.objects for _ in range(obj.count)]
    for _ in range(MAX_TRIES):
        boxes: list[Box] = []
        for obj in kinds:
            low, high = _side_range(scene, obj)
            side = _scale(int(rng.integers(low, high + 1)), size)
            if side + 2 * border > size:
                break
            x0, y0 = (int(v) for v in rng.integers(border, size - border - side + 1, size=2))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if not all(_apart(box, other, gap) for other in boxes):
                break
            boxes.append(box)
        else:
            if scene.relation is None or _relation_holds(boxes[0], boxes[1], scene.relation, gap):
                return list(zip(kinds, boxes))
    raise PlacementError(f"could not place {scene.to_text()!r} in a {size}px image after {MAX_TRIES} tries; "
                         f"use a larger image or smaller SIZE_RANGES")


def _jitter(colour: tuple[int, int, int], amount: int, rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.add(colour, rng.integers(-amount, amount + 1, size=3)), 0, 255))


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, box: Box, colour: tuple[int, ...], size: int) -> None:
    x0, y0, x1, y1 = box
    side = x1 - x0 + 1
    # Stroke of 2 px, 3 px for the larger outlined shapes (at 64 px).
    stroke = _scale(2 if side < _scale(21, size) else 3, size)
    fill, outline = (colour, None) if obj.style == "filled" else (None, colour)
    width = 0 if obj.style == "filled" else stroke
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill, outline=outline, width=width)


def render(scene_or_text: Scene | str, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw one RGB image of the scene (a `Scene` or a prompt text); pass `rng` for reproducibility."""
    scene = parse(scene_or_text) if isinstance(scene_or_text, str) else scene_or_text
    if size < 32:
        raise ValueError(f"size must be at least 32 px for recognisable shapes, got {size}")
    rng = np.random.default_rng() if rng is None else rng
    image = Image.new("RGB", (size, size), _jitter(BACKGROUND, BACKGROUND_JITTER, rng))
    draw = ImageDraw.Draw(image)
    for obj, box in _layout(scene, size, rng):
        _draw(draw, obj, box, _jitter(PALETTE[obj.colour], COLOUR_JITTER, rng), size)
    return image


def render_batch(prompts: Sequence[Scene | str], seed: int, size: int = 64) -> np.ndarray:
    """Render each prompt once into a uint8 array (N, size, size, 3); image i depends only on (seed, i, prompt)."""
    if not prompts:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([np.asarray(render(p, size, np.random.default_rng([seed, i]))) for i, p in enumerate(prompts)])
