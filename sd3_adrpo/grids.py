"""The pictures a run writes: the periodic sample grid (base and policy side by side, each tile with its prompt and
reward) over a category-balanced subset of the held-out prompts, and the final evaluation's base-vs-trained grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from sd3_adrpo.config import TrainConfig
from sd3_adrpo.io import captioned_grid, save_png, side_by_side
from sd3_adrpo.prompts import balanced_subset, load_prompts
from sd3_adrpo.rewards import held_out_rewards

if TYPE_CHECKING:
    from sd3_adrpo.evaluation import PolicyEval
    from sd3_adrpo.rollout import SD3Sampler


def captioned(images: np.ndarray, prompts: list[str], scores, per_row: int, score_name: str = "reward") -> np.ndarray:
    """A grid of ``per_row`` tiles a row, each captioned with its prompt in full and its score."""
    return captioned_grid(images, [f"{p}\n{score_name} {s:.2f}" for p, s in zip(prompts, scores)], per_row)


def sample_grid(sampler: "SD3Sampler", reward_fn, prompts: list[str], cfg: TrainConfig, generator: torch.Generator,
                path: Optional[Path] = None, base: Optional[tuple] = None, title: str = "Base",
                metadata: Optional[dict] = None) -> tuple[dict, np.ndarray, tuple]:
    """Held-out prompts x ``sample_images_per_prompt`` images from ``generator`` (the same noise every time, so grids
    are comparable over training), each tile captioned with its prompt and reward; with ``base`` (the base's (images,
    prompts, rewards) from the same noise) the base's grid and this one side by side in one image. Written to
    ``path`` (if given); returns the logged stats, the image and this grid's (images, prompts, rewards)."""
    k = cfg.sample_images_per_prompt
    rollout = sampler.sample(prompts, k, cfg.resolution, generator)
    rewards = held_out_rewards(reward_fn, rollout.images, rollout.prompts, "sample grid", metadata)
    this = (rollout.images.numpy(), rollout.prompts, rewards)
    panels = {"Base": captioned(*base, k)} if base else {}
    image = side_by_side({**panels, title: captioned(*this, k)})
    if path is not None:
        save_png(path, image)
    return {"eval_reward_mean": float(np.nanmean(rewards))}, image, this


def comparison_grid(base: "PolicyEval", trained: "PolicyEval", images_per_prompt: int, seed: int,
                    num_prompts: int = 8) -> np.ndarray:
    """The final evaluation in one picture: base and trained side by side on up to ``num_prompts`` of its prompts,
    balanced over their categories, each tile with its prompt and ClipScore."""
    k = images_per_prompt
    unique = base.prompts[::k]
    shown = set(balanced_subset(unique, None if base.category is None else base.category[::k], num_prompts, seed))
    idx = [i for i, p in enumerate(base.prompts) if p in shown]
    return side_by_side({label: captioned(ev.images[idx], [ev.prompts[i] for i in idx], ev.clip_score[idx], k,
                                          "ClipScore")
                         for label, ev in (("Base", base), ("Trained", trained))})


def select_grid_prompts(cfg: TrainConfig) -> list[str]:
    """The periodic grids' prompts: ``num_sample_prompts`` of eval_prompts, balanced over the prompt categories that a
    judge reports (the tiny world's oracle: colour, counting, position, binding), else a seeded random subset."""
    if not (cfg.eval_prompts and cfg.sample_every):
        return []
    prompts = load_prompts(cfg.eval_prompts)
    return balanced_subset(prompts, prompt_categories(cfg.judges, prompts), cfg.num_sample_prompts, cfg.seed)


def prompt_categories(judge_specs: list[str], prompts: list[str]) -> Optional[list[str]]:
    """Prompt categories from the first judge that sorts prompts into any and needs no weights for it (categories
    are asked of a judge built without weights only where its class defines them, so no model is loaded)."""
    from sd3_adrpo.metrics import Metric, metric_class
    from sd3_adrpo.reward_spec import judge_term

    for spec in judge_specs:
        try:  # read as the judges setting reads it (NAME[@WEIGHTS] or a one-entry YAML mapping with options)
            cls = metric_class(judge_term(spec).spec)
            if cls.categories is Metric.categories:
                continue
            categories = cls().categories(prompts)
        except (TypeError, ValueError, AttributeError):  # a spec of another form, needs weights, or other prompts
            continue
        if categories is not None:
            return categories
    return None
