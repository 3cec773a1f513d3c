"""The tiny world's oracle as a scorer: a judge that a config names (``judges: ["tinyworld.scorers:Oracle"]``,
``eval/table1.py --judge tinyworld.scorers:Oracle``) and the worked example of a verifiable reward
(``reward: tinyworld.scorers:Oracle``, see docs/rewards.md).

It returns 1.0 where the oracle accepts the image for its prompt, else 0.0 (with ``partial=True``, the fraction of
the oracle's checks that pass: colour, count, shape, style and, for position prompts, the relation), and sorts
prompts into the grammar's categories, so every table and summary also gets ``oracle_accuracy_<category>`` columns.

What the image must show comes from the prompt's metadata when its row in a .jsonl/.csv prompt file has GenEval's
fields (``tag``: the category; ``include``: a list of ``{"class": shape, "color": colour, "count": n}``, optionally
``"style": "outlined"``; ``relation`` for position prompts, e.g. "left of"), so any wording of the prompt can be
verified; otherwise from the prompt text, which must then be a canonical tiny-world caption.
``python -m tinyworld.scorers metadata prompts/tinyworld_train.txt out.jsonl`` writes a prompt file with those
fields. Trained
on, the oracle is a verifiable reward; as a judge of a run trained on CLIP it exposes reward hacking of the learned
reward.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import numpy as np

from sd3_adrpo.metrics import Metric
from sd3_adrpo.metrics.base import as_uint8_images

from .grammar import Obj, Scene, parse
from .oracle import check


def geneval_metadata(scene: Scene) -> dict:
    """A scene as GenEval-style prompt metadata: ``tag``, ``include`` (and ``relation`` for position scenes)."""
    include = [{"class": o.shape, "color": o.colour, "count": o.count, **({"style": o.style} if o.style != "filled"
                                                                          else {})} for o in scene.objects]
    return {"tag": scene.category, "include": include, **({"relation": scene.relation} if scene.relation else {})}


def scene_from_metadata(meta: dict) -> Scene:
    """The inverse of ``geneval_metadata``; ValueError saying which field is wrong."""
    try:
        objects = tuple(Obj(o["class"], o["color"], int(o.get("count", 1)), o.get("style", "filled"))
                        for o in meta["include"])
        return Scene(meta["tag"], objects, meta.get("relation"))
    except (KeyError, TypeError) as e:
        raise ValueError(f"tiny-world oracle metadata {meta!r}: needs tag and include: [{{class, color, count}}] "
                         f"({type(e).__name__}: {e})") from None


class Oracle(Metric):
    """Oracle accuracy per image (1.0 or 0.0; ``partial``: the fraction of checks passed); ``categories`` gives each
    prompt's grammar category."""

    key, label = "oracle_accuracy", "Oracle acc."

    def __init__(self, weights=None, device="cpu", partial: bool = False):
        if weights is not None:
            raise ValueError("the tiny-world oracle has no weights: name it without '@...'")
        self.partial = bool(partial)

    def scene(self, prompt: str, meta: Optional[dict] = None) -> Scene:
        if meta and "include" in meta:
            return scene_from_metadata(meta)
        try:
            return parse(prompt)
        except ValueError as e:
            raise ValueError(f"the tiny-world oracle judges only prompts of its grammar (or rows with GenEval-style "
                             f"metadata: tag, include); {prompt!r}: {e}") from None

    def __call__(self, images, prompts: list[str], metadata: Optional[list[dict]] = None) -> np.ndarray:
        images = as_uint8_images(images, prompts)
        scenes = [self.scene(p, m) for p, m in zip(prompts, metadata or [None] * len(prompts))]
        results = [check(im, s) for im, s in zip(images, scenes)]
        if not self.partial:
            return np.array([float(r.ok) for r in results])
        checks = [[r.colour_ok, r.count_ok, r.shape_ok, r.style_ok] + ([r.position_ok] if r.position_ok is not None
                                                                        else []) for r in results]
        return np.array([float(np.mean(c)) for c in checks])

    def categories(self, prompts: list[str], metadata: Optional[list[dict]] = None) -> list[str]:
        return [self.scene(p, m).category for p, m in zip(prompts, metadata or [None] * len(prompts))]


def write_aesthetic_stand_in(out, clip: str, seed: int = 0) -> str:
    """A random aesthetic head (``LinearHead``) sized for ``clip``'s image embedding, saved as a state dict at
    ``out``: the stand-in that lets ``aesthetic`` train on the tiny world (the real head takes ViT-L/14's 768-d)."""
    import torch
    from transformers import CLIPConfig

    from sd3_adrpo.metrics.base import LinearHead

    torch.manual_seed(seed)
    head = LinearHead(CLIPConfig.from_pretrained(clip).projection_dim)
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), out)
    return str(out)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Tiny-world scorer helpers.")
    sub = ap.add_subparsers(dest="command", required=True)
    meta = sub.add_parser("metadata", help="write a .jsonl prompt file with GenEval-style metadata (tag, include, "
                                           "relation) for each tiny-world prompt of a file")
    meta.add_argument("prompts", help="a file of canonical tiny-world prompts (.txt, .jsonl or .csv)")
    meta.add_argument("out", help="the .jsonl to write")
    head = sub.add_parser("aesthetic-head", help="write a random aesthetic head sized for a CLIP (a stand-in)")
    head.add_argument("out", help="the .pth to write")
    head.add_argument("--clip", default="assets/tinyworld/clip", help="the CLIP folder the head will read")
    head.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.command == "aesthetic-head":
        print(f"wrote a random aesthetic head for {args.clip} to {write_aesthetic_stand_in(args.out, args.clip, args.seed)}")
        return
    from sd3_adrpo.io import atomic_write_bytes
    from sd3_adrpo.prompts import load_prompts

    rows = [json.dumps({"prompt": p, **geneval_metadata(parse(p))}) for p in load_prompts(args.prompts)]
    atomic_write_bytes(args.out, ("\n".join(rows) + "\n").encode())
    print(f"wrote {len(rows)} prompts with their metadata to {args.out}")


if __name__ == "__main__":
    main()
