"""Prompt grammar of the tiny world: scenes, their captions, and the train/tune/held-out splits.

A prompt is the canonical text of a `Scene`; `parse` and `Scene.to_text` are exact inverses on every
prompt the grammar produces. Four categories, mirroring the paper's qualitative ones:

- colour:   "a red circle", "an outlined blue square"        (6 colours x 3 shapes x 2 styles = 36)
- counting: "one green triangle", "three orange squares"     (6 x 3 x counts 1-4 = 72)
- position: "a red circle to the left of a blue square"      (two colours differ; 4 relations = 1080)
- binding:  "a red circle and a blue square"                 (colours differ, shapes differ = 180)

Splits (`splits(seed)`). Held-out prompts are combinations the generator never saw, in two kinds:

- counting, position, binding: three colour-shape pairs with distinct colours and shapes are held out (chosen by
  the seed). Every counting/position/binding prompt that contains one is held out; the generator sees each held-out
  pair only as a single object ("a red triangle", "an outlined red triangle"; with seed 0 in both styles), never
  counted, placed or bound.
- colour: six colour prompts, three filled and three outlined, with distinct colour-shape pairs, none of them a
  held-out pair (chosen by the seed): each is a colour-shape-style combination never seen, whose pair the generator
  sees in other categories.

Until 2026-11-28 the held-out colour prompts were the outlined prompts of the three held-out pairs instead; that made
colour the hardest held-out category for the tiny generator (it had drawn those pairs once, filled), where SD3's
failures are in counting, position and binding. `tune` is a random 10% of each category's prompts without a held-out
pair (for colour: without the outlined held-out-pair prompts), drawn exactly as before that change, so the tune split
on which the RL defaults were chosen stayed the same; held-out colour prompts are drawn from outside it. Sizes for
seed 0 (`split_sizes()`):

    category  train  tune  heldout
    colour       27     3        6
    counting     54     6       12
    position    670    74      336
    binding     113    13       54

`variants(scene)` lists the valid scenes that differ in exactly one attribute (hard negatives, oracle tests).
"""
from __future__ import annotations

import argparse
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
STYLES = ("filled", "outlined")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("colour", "counting", "position", "binding")
NUMBER_WORDS = ("one", "two", "three", "four")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
SPLIT_NAMES = ("train", "tune", "heldout")


@dataclass(frozen=True)
class Obj:
    """One kind of object in a scene: `count` copies of a `colour` `shape` drawn `style`."""

    shape: str
    colour: str
    count: int = 1
    style: str = "filled"

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.style, STYLES, "style")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if not 1 <= self.count <= len(NUMBER_WORDS):
            raise ValueError(f"count must be 1 to {len(NUMBER_WORDS)}, got {self.count}")


@dataclass(frozen=True)
class Scene:
    """A parsed prompt. For position scenes, `relation` reads "objects[0] is <relation> objects[1]"."""

    category: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; choose one of {', '.join(CATEGORIES)}")
        n_objects = 1 if self.category in ("colour", "counting") else 2
        if len(self.objects) != n_objects:
            raise ValueError(f"a {self.category} scene has {n_objects} object(s), got {len(self.objects)}")
        if (self.relation is not None) != (self.category == "position"):
            raise ValueError(f"only position scenes have a relation (got {self.relation!r} for {self.category})")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; choose one of {', '.join(RELATIONS)}")
        if self.category != "colour" and any(o.style != "filled" for o in self.objects):
            raise ValueError(f"the outlined style only appears in colour scenes, not {self.category}")
        if self.category != "counting" and any(o.count != 1 for o in self.objects):
            raise ValueError(f"counts other than 1 only appear in counting scenes, not {self.category}")
        if n_objects == 2 and self.objects[0].colour == self.objects[1].colour:
            raise ValueError("the two objects of a scene must have different colours")
        if self.category == "binding" and self.objects[0].shape == self.objects[1].shape:
            raise ValueError("the two objects of a binding scene must have different shapes")

    def to_text(self) -> str:
        """The canonical caption of this scene."""
        if self.category == "counting":
            obj = self.objects[0]
            plural = "s" if obj.count > 1 else ""
            return f"{NUMBER_WORDS[obj.count - 1]} {obj.colour} {obj.shape}{plural}"
        phrases = [_noun_phrase(o) for o in self.objects]
        if self.category == "colour":
            return phrases[0]
        joiner = _RELATION_TEXT[self.relation] if self.category == "position" else "and"
        return f"{phrases[0]} {joiner} {phrases[1]}"


def _noun_phrase(obj: Obj) -> str:
    words = (["outlined"] if obj.style == "outlined" else []) + [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_NP = rf"an? (outlined )?({_C}) ({_S})"
_FORMS = (
    ("counting", re.compile(rf"({'|'.join(NUMBER_WORDS)}) ({_C}) ({_S})s?")),
    ("position", re.compile(rf"{_NP} ({'|'.join(_RELATION_TEXT.values())}) {_NP}")),
    ("binding", re.compile(rf"{_NP} and {_NP}")),
    ("colour", re.compile(_NP)),
)
_VOCABULARY = set(" ".join([*COLOURS, *SHAPES, *NUMBER_WORDS, *_RELATION_TEXT.values(),
                            "a an and outlined", *(s + "s" for s in SHAPES)]).split())


def parse(text: str) -> Scene:
    """Parse a canonical tiny-world caption (the output of `Scene.to_text`) into its `Scene`."""
    for category, pattern in _FORMS:
        match = pattern.fullmatch(text)
        if match:
            break
    else:
        unknown = sorted({w for w in text.split() if w not in _VOCABULARY})
        hint = f"unknown word(s) {unknown}; " if unknown else ""
        raise ValueError(f"{text!r} is not a tiny-world prompt: {hint}expected lower-case forms like "
                         f"'a red circle', 'two blue squares', 'a red circle to the left of a blue square' or "
                         f"'a red circle and a blue square' (see tinyworld.grammar.all_prompts())")
    g = match.groups()
    try:
        if category == "counting":
            scene = Scene(category, (Obj(g[2], g[1], NUMBER_WORDS.index(g[0]) + 1),))
        else:
            starts = (0,) if category == "colour" else (0, len(g) - 3)
            objects = [Obj(g[i + 2], g[i + 1], 1, "outlined" if g[i] else "filled") for i in starts]
            relation = {v: k for k, v in _RELATION_TEXT.items()}[g[3]] if category == "position" else None
            scene = Scene(category, tuple(objects), relation)
    except ValueError as err:
        raise ValueError(f"{text!r} is outside the tiny-world grammar: {err}") from None
    if scene.to_text() != text:
        raise ValueError(f"{text!r} is not canonical (article or plural); did you mean {scene.to_text()!r}?")
    return scene


def all_scenes() -> list[Scene]:
    """Every scene of the grammar, in a fixed order (category, then vocabulary order)."""
    return [s for category in CATEGORIES for s in _scenes_of(category)]


def _scenes_of(category: str) -> Iterator[Scene]:
    singles = [Obj(shape, colour) for colour in COLOURS for shape in SHAPES]
    if category == "colour":
        yield from (Scene("colour", (replace(o, style=style),)) for style in STYLES for o in singles)
    elif category == "counting":
        yield from (Scene("counting", (replace(o, count=n),)) for o in singles for n in range(1, 5))
    else:
        for a in singles:
            for b in singles:
                if a.colour == b.colour or (category == "binding" and a.shape == b.shape):
                    continue
                relations = RELATIONS if category == "position" else (None,)
                yield from (Scene(category, (a, b), r) for r in relations)


def variants(scene: Scene) -> list[tuple[str, Scene]]:
    """Valid scenes differing from `scene` in one attribute, each labelled by the changed aspect.

    Aspects: "colour" (an object takes a colour unused in the scene), "shape", "count", "style",
    "relation" (any other relation) and "swap" (binding: the two objects exchange colours).
    """
    out: list[tuple[str, Scene]] = []
    used_colours = {o.colour for o in scene.objects}
    for i, obj in enumerate(scene.objects):
        # binding shapes must differ, so a shape change may not take the other object's shape
        taken = {o.shape for o in scene.objects} if scene.category == "binding" else {obj.shape}
        changes = [("colour", {"colour": c}) for c in COLOURS if c not in used_colours]
        changes += [("shape", {"shape": s}) for s in SHAPES if s not in taken]
        if scene.category == "counting":
            changes += [("count", {"count": n}) for n in range(1, len(NUMBER_WORDS) + 1) if n != obj.count]
        if scene.category == "colour":
            changes += [("style", {"style": "outlined" if obj.style == "filled" else "filled"})]
        for aspect, change in changes:
            objects = list(scene.objects)
            objects[i] = replace(obj, **change)
            out.append((aspect, replace(scene, objects=tuple(objects))))
    if scene.relation is not None:
        out += [("relation", replace(scene, relation=r)) for r in RELATIONS if r != scene.relation]
    if scene.category == "binding":
        a, b = scene.objects
        out.append(("swap", replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))))
    return out


def all_prompts() -> list[str]:
    """Every caption the grammar can produce (the CLIP judge may see all of them)."""
    return [s.to_text() for s in all_scenes()]


def heldout_pairs(seed: int = 0) -> tuple[tuple[str, str], ...]:
    """Three (colour, shape) pairs with distinct colours and shapes, never counted, placed or bound in training."""
    rnd = random.Random(seed)
    return tuple(zip(rnd.sample(COLOURS, 3), rnd.sample(SHAPES, 3)))


def uses_heldout_pair(scene: Scene, pairs: tuple[tuple[str, str], ...]) -> bool:
    """True when an object of the scene is one of the held-out colour-shape `pairs`."""
    return any((o.colour, o.shape) in pairs for o in scene.objects)


HELDOUT_COLOUR_PROMPTS = 6


def splits(seed: int = 0, tune_fraction: float = 0.1) -> dict[str, list[str]]:
    """Deterministic train/tune/heldout prompt lists (each in `all_prompts` order); see the module doc."""
    pairs = heldout_pairs(seed)
    rnd = random.Random(f"tune-{seed}")
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for category in CATEGORIES:
        scenes = list(_scenes_of(category))
        # the tune draw of the split's first version, whose pool left out the outlined held-out-pair colour prompts
        pool = [i for i, s in enumerate(scenes) if not (uses_heldout_pair(s, pairs) and
                                                        (category != "colour" or s.objects[0].style == "outlined"))]
        tune = set(rnd.sample(pool, max(1, round(tune_fraction * len(pool)))))
        if category == "colour":
            heldout = _heldout_colour(scenes, pairs, tune, random.Random(f"colour-{seed}"))
        else:
            heldout = {i for i, s in enumerate(scenes) if uses_heldout_pair(s, pairs)}
        for i, scene in enumerate(scenes):
            name = "heldout" if i in heldout else "tune" if i in tune else "train"
            out[name].append(scene.to_text())
    return out


def _heldout_colour(scenes: list[Scene], pairs, tune: set[int], rnd: random.Random) -> set[int]:
    """`HELDOUT_COLOUR_PROMPTS` colour scenes outside `tune`, half of each style, with distinct pairs that are not
    held-out pairs."""
    candidates = [i for i, s in enumerate(scenes) if i not in tune and not uses_heldout_pair(s, pairs)]
    per_style = HELDOUT_COLOUR_PROMPTS // len(STYLES)
    chosen: dict[tuple[str, str], int] = {}
    for i in rnd.sample(candidates, len(candidates)):
        obj = scenes[i].objects[0]
        if sum(scenes[j].objects[0].style == obj.style for j in chosen.values()) < per_style:
            chosen.setdefault((obj.colour, obj.shape), i)
    return set(chosen.values())


def split_sizes(seed: int = 0) -> dict[str, dict[str, int]]:
    """{category: {split: number of prompts}} for `splits(seed)`."""
    sizes = {c: dict.fromkeys(SPLIT_NAMES, 0) for c in CATEGORIES}
    for name, prompts in splits(seed).items():
        for text in prompts:
            sizes[parse(text).category][name] += 1
    return sizes


def write_prompt_files(directory: str | Path, seed: int = 0) -> list[Path]:
    """Write tinyworld_{train,tune,heldout}.txt (one prompt per line) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, prompts in splits(seed).items():
        path = directory / f"tinyworld_{name}.txt"
        path.write_text("".join(p + "\n" for p in prompts))
        paths.append(path)
    return paths


def read_prompt_file(path: str | Path) -> list[str]:
    """Read a prompt file written by `write_prompt_files`, checking every line against the grammar."""
    prompts = [line for line in Path(path).read_text().splitlines() if line.strip()]
    for text in prompts:
        parse(text)
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description="Tiny-world prompt grammar: split sizes and prompt files.")
    parser.add_argument("--write", metavar="DIR", help="write tinyworld_{train,tune,heldout}.txt into DIR")
    parser.add_argument("--seed", type=int, default=0, help="seed choosing held-out pairs and tune prompts")
    args = parser.parse_args()
    print(f"held-out pairs: {heldout_pairs(args.seed)}")
    print(f"{'category':10s}" + "".join(f"{n:>9s}" for n in SPLIT_NAMES))
    for category, sizes in split_sizes(args.seed).items():
        print(f"{category:10s}" + "".join(f"{sizes[n]:9d}" for n in SPLIT_NAMES))
    if args.write:
        for path in write_prompt_files(args.write, args.seed):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
