"""Programmatic checker of tiny-world images against their prompt: the tiny world's GenEval.

Method, for an (H, W, 3) uint8 image of any square size:
1. Segment: nearest palette colour, measured to the line from the background to each colour, so a pixel
   blended with the background (blurred or decoded edges) still counts as the object when it is at least
   half-way along that line. Pixels off every line by more than `MAX_COLOUR_DISTANCE`, or nearer the
   background, are ignored. Blobs thus follow the half-maximum contour and keep their shape under blur.
2. Blobs: 8-connected components per palette colour, built from horizontal runs with union-find (fast in
   pure Python: a 64 px image has a few hundred runs). Blobs under `MIN_AREA` px (at 64 px) are specks.
3. Per blob: the row-span hull (each row filled from its leftmost to its rightmost pixel; this fills the hole of
   an outline because every tiny-world shape is convex). Upright triangles are bottom-heavy (hull centroid
   1/6 of the height below the bbox centre); circle and square are centred and told apart by the hull/bbox
   fill ratio (0.79 against 1). Style is area/hull: filled ~1, outlined below `OUTLINED_BELOW`.
4. Compare with the scene: the set of blob colours must equal the prompt's colours (an extra object of
   another colour fails), each colour has the prompted count, shape and style, and for position prompts
   the centroid offset along the relation axis is at least `POSITION_MARGIN` of the image size and larger
   than the perpendicular offset.

Measured (`python -m tinyworld.oracle`): see `benchmark`.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .grammar import CATEGORIES, Scene, all_scenes, parse, variants
from .render import BACKGROUND, PALETTE, render, render_batch

MAX_COLOUR_DISTANCE = 60.0  # RGB distance to the background->colour line
MIN_AREA = 12  # px at 64 px, scaled by area for other sizes
CIRCLE_FILL, SQUARE_FILL = 0.66, 0.88  # hull/bbox fill ratio: circle from, square from
TRIANGLE_DROP = 0.06  # hull centroid below the bbox centre, in heights
MAX_ASPECT = 1.6  # bbox longer side / shorter side; beyond it the blob is no recognisable shape
OUTLINED_BELOW = 0.85  # area/hull; renders give filled 1.0, outlined 0.32-0.70
POSITION_MARGIN = 0.08  # of the image size
ASPECTS = ("colour", "count", "shape", "style", "position")

_COLOUR_NAMES = tuple(PALETTE)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array(list(PALETTE.values()), dtype=np.float32) - _BACKGROUND  # background -> colour lines
_LENGTHS2 = (_DIRECTIONS**2).sum(axis=1)


@dataclass(frozen=True)
class Blob:
    """One connected component of a palette colour."""

    colour: str
    area: int
    centroid: tuple[float, float]  # (x, y)
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    shape: str  # circle, square, triangle, or unknown
    style: str  # filled or outlined


@dataclass(frozen=True)
class OracleResult:
    """Verdict on one image. `colour_ok`: the blob colours are exactly the prompt's; `count_ok`: each prompted
    colour has the prompted number of blobs; `shape_ok` / `style_ok`: every blob of a prompted colour has the
    prompted shape / style; `position_ok`: the relation holds between the largest blobs of the two colours
    (None for prompts without a relation)."""

    ok: bool
    category: str
    colour_ok: bool
    count_ok: bool
    shape_ok: bool
    style_ok: bool
    position_ok: bool | None
    blobs: tuple[Blob, ...]
    reason: str  # empty when ok, else what went wrong


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A square RGB uint8 (H, W, 3) array from a PIL image or an array; raises ValueError otherwise."""
    array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}; round and clamp to 0..255 first")
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {array.shape}")
    return array


def segment(array: np.ndarray) -> np.ndarray:
    """Per-pixel index into PALETTE order, or -1 for background and unknown pixels.

    A pixel belongs to colour c when it lies within `MAX_COLOUR_DISTANCE` of the line from the background to
    c, at least half-way along it, and nearer that line than to any other colour's line.
    """
    pixels = array.astype(np.float32) - _BACKGROUND
    projection = pixels @ _DIRECTIONS.T  # (H, W, colours)
    alpha = projection / _LENGTHS2  # position along each line: 0 background, 1 palette colour
    residual2 = (pixels**2).sum(axis=2, keepdims=True) - projection**2 / _LENGTHS2  # squared distance to line
    residual2[alpha < 0.5] = np.inf
    labels = residual2.argmin(axis=2)
    labels[residual2.min(axis=2) > MAX_COLOUR_DISTANCE**2] = -1
    return labels


def _runs(mask: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """Horizontal runs of True as (rows, starts, ends) with exclusive ends, in row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows.tolist(), starts.tolist(), ends.tolist()


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """8-connected components of a boolean mask, each a list of (row, start, end) runs."""
    rows, starts, ends = _runs(mask)
    parent = list(range(len(rows)))
    previous: list[int] = []  # run indices of the row above
    current: list[int] = []
    for i, row in enumerate(rows):
        if i and row != rows[i - 1]:
            previous, current = (current if rows[i - 1] == row - 1 else []), []
        for j in previous:  # 8-connectivity: runs touch if their column ranges overlap or meet diagonally
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                parent[_find(parent, i)] = _find(parent, j)
        current.append(i)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i in range(len(rows)):
        groups.setdefault(_find(parent, i), []).append((rows[i], starts[i], ends[i]))
    return list(groups.values())


def _features(runs: list[tuple[int, int, int]]) -> dict:
    """Area, centroid, bbox and row-span-hull features of one component."""
    area = sum(e - s for _, s, e in runs)
    spans: dict[int, list[int]] = {}
    for r, s, e in runs:
        span = spans.setdefault(r, [s, e])
        span[0], span[1] = min(span[0], s), max(span[1], e)
    hull = sum(e - s for s, e in spans.values())
    x0, x1 = min(s for s, _ in spans.values()), max(e for _, e in spans.values()) - 1
    y0, y1 = min(spans), max(spans)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    hull_cy = sum(r * (e - s) for r, (s, e) in spans.items()) / hull
    return {
        "area": area,
        "centroid": (sum((s + e - 1) * (e - s) / 2 for _, s, e in runs) / area,
                     sum(r * (e - s) for r, s, e in runs) / area),
        "bbox": (x0, y0, x1, y1),
        "aspect": max(width, height) / min(width, height),
        "fill": hull / (width * height),  # triangle 0.5, circle 0.79, square 1
        "drop": (hull_cy - (y0 + y1) / 2) / height,  # upright triangle 1/6, circle and square 0
        "solidity": area / hull,  # filled 1, outlined < 0.7
    }


def _classify(runs: list[tuple[int, int, int]], colour: str) -> Blob:
    f = _features(runs)
    if f["aspect"] > MAX_ASPECT:
        shape = "unknown"
    elif f["drop"] > TRIANGLE_DROP and f["fill"] < SQUARE_FILL:
        shape = "triangle"
    elif abs(f["drop"]) <= TRIANGLE_DROP and f["fill"] >= CIRCLE_FILL:
        shape = "square" if f["fill"] >= SQUARE_FILL else "circle"
    else:
        shape = "unknown"
    style = "outlined" if f["solidity"] < OUTLINED_BELOW else "filled"
    return Blob(colour, f["area"], f["centroid"], f["bbox"], shape, style)


def find_blobs(image: Image.Image | np.ndarray) -> list[Blob]:
    """All non-speck blobs of palette colours in the image."""
    array = to_array(image)
    labels = segment(array)
    min_area = MIN_AREA * (array.shape[0] / 64) ** 2
    blobs = []
    for index in np.unique(labels[labels >= 0]).tolist():
        for runs in _components(labels == index):
            if sum(e - s for _, s, e in runs) >= min_area:
                blobs.append(_classify(runs, _COLOUR_NAMES[index]))
    return blobs


def _relation_ok(a: Blob, b: Blob, relation: str, size: int) -> bool:
    dx, dy = a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1]
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    if relation in ("left of", "above"):
        along = -along
    return along >= POSITION_MARGIN * size and along > abs(across)


def check(image: Image.Image | np.ndarray, prompt: Scene | str) -> OracleResult:
    """Check one image against its prompt (text or Scene)."""
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    array = to_array(image)
    blobs = find_blobs(array)
    by_colour = {o.colour: [b for b in blobs if b.colour == o.colour] for o in scene.objects}
    wanted = set(by_colour)
    found = {b.colour for b in blobs}
    problems = []
    colour_ok = found == wanted
    if not colour_ok:
        problems.append(f"colours found {sorted(found)}, expected {sorted(wanted)}")
    count_ok, shape_ok, style_ok = True, True, True
    for obj in scene.objects:
        mine = by_colour[obj.colour]
        if len(mine) != obj.count:
            count_ok = False
            problems.append(f"{len(mine)} {obj.colour} blob(s), expected {obj.count}")
        if any(b.shape != obj.shape for b in mine):
            shape_ok = False
            problems.append(f"{obj.colour} shapes {[b.shape for b in mine]}, expected {obj.shape}")
        if any(b.style != obj.style for b in mine):
            style_ok = False
            problems.append(f"{obj.colour} styles {[b.style for b in mine]}, expected {obj.style}")
    position_ok = None
    if scene.relation is not None:
        first, second = (by_colour[o.colour] for o in scene.objects)
        position_ok = bool(first and second) and _relation_ok(
            max(first, key=lambda b: b.area), max(second, key=lambda b: b.area), scene.relation, array.shape[0])
        if not position_ok:
            problems.append(f"relation {scene.relation!r} does not hold")
    ok = colour_ok and count_ok and shape_ok and style_ok and position_ok is not False
    return OracleResult(ok, scene.category, colour_ok, count_ok, shape_ok, style_ok, position_ok,
                        tuple(blobs), "; ".join(problems))


def evaluate(images: Sequence[Image.Image | np.ndarray] | np.ndarray, prompts: Sequence[Scene | str]) -> dict:
    """Oracle accuracy over image/prompt pairs.

    Returns {"accuracy": float, "n": int, "per_category": {category: accuracy}, "n_per_category":
    {category: n}, "per_aspect": {aspect: fraction of applicable images where that aspect is right},
    "per_count": {"1".."4": accuracy of counting images asking for that many objects}, "n_per_count": {...}};
    categories and counts without images are left out.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    if len(prompts) == 0:
        raise ValueError("evaluate needs at least one image")
    results = [check(image, prompt) for image, prompt in zip(images, prompts)]
    per_category, n_per_category = {}, {}
    for category in CATEGORIES:
        oks = [r.ok for r in results if r.category == category]
        if oks:
            per_category[category], n_per_category[category] = float(np.mean(oks)), len(oks)
    per_aspect = {}
    for aspect in ASPECTS:
        values = [getattr(r, f"{aspect}_ok") for r in results]
        values = [v for v in values if v is not None]
        if values:
            per_aspect[aspect] = float(np.mean(values))
    # counting asks for one to four objects; a one-object prompt is a single-object test (GenEval's counting task
    # starts at two), so the accuracy by number is reported too
    by_count: dict[str, list[bool]] = {}
    for prompt, r in zip(prompts, results):
        if r.category == "counting":
            scene = parse(prompt) if isinstance(prompt, str) else prompt
            by_count.setdefault(str(scene.objects[0].count), []).append(r.ok)
    per_count = {k: float(np.mean(v)) for k, v in sorted(by_count.items())}
    return {"accuracy": float(np.mean([r.ok for r in results])), "n": len(results),
            "per_category": per_category, "n_per_category": n_per_category, "per_aspect": per_aspect,
            "per_count": per_count, "n_per_count": {k: len(v) for k, v in sorted(by_count.items())}}


def benchmark(n: int = 2000, seed: int = 2025) -> dict:
    """Oracle accuracy on `n` ground-truth renders (equal share per category), ms per image, and the
    rejection rate of renders of one-attribute variants (`grammar.variants`) checked against the original."""
    rng = np.random.default_rng(seed)
    by_category = {c: [s for s in all_scenes() if s.category == c] for c in CATEGORIES}
    scenes = [by_category[c][i] for c in CATEGORIES for i in rng.integers(len(by_category[c]), size=n // 4)]
    images = render_batch(scenes, seed)
    start = time.perf_counter()
    report = evaluate(images, scenes)
    report["ms_per_image"] = 1e3 * (time.perf_counter() - start) / len(scenes)
    rejected: dict[str, list[bool]] = {}
    for scene in scenes:
        options: dict[str, list[Scene]] = {}
        for aspect, variant in variants(scene):
            options.setdefault(aspect, []).append(variant)
        for aspect, candidates in options.items():
            image = render(candidates[rng.integers(len(candidates))], rng=rng)
            rejected.setdefault(aspect, []).append(not check(image, scene).ok)
    report["rejection"] = {a: float(np.mean(v)) for a, v in rejected.items()}
    report["n_rejection"] = {a: len(v) for a, v in rejected.items()}
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Measure the oracle on fresh ground-truth renders.")
    parser.add_argument("--n", type=int, default=2000, help="number of ground-truth renders")
    parser.add_argument("--seed", type=int, default=2025)
    result = benchmark(**vars(parser.parse_args()))
    print(f"ground truth: accuracy {result['accuracy']:.4f} on {result['n']} renders, "
          f"{result['ms_per_image']:.2f} ms/image")
    for category, accuracy in result["per_category"].items():
        print(f"  {category:9s} {accuracy:.4f} (n={result['n_per_category'][category]})")
    print("rejection of one-attribute variants:")
    for aspect, rate in result["rejection"].items():
        print(f"  {aspect:9s} {rate:.4f} (n={result['n_rejection'][aspect]})")
