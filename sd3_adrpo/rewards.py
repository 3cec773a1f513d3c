"""Training rewards: any scorer of the one registry (``sd3_adrpo.metrics``), alone or as a weighted sum.

A training reward and an evaluation metric are the same object, a ``sd3_adrpo.metrics.Metric``: it maps
(uint8 images (B, H, W, 3), prompts) -> float64 scores (B,). The config's ``reward`` names one or several:

    reward: clip                              # one scorer; its weights from reward_model (as before)
    reward: pickscore@path/to/PickScore_v1    # NAME@WEIGHTS: the scorer's own weights
    reward: clip=1,aesthetic@head.pth=0.5     # a weighted sum (also --reward clip=1,aesthetic@head.pth=0.5)
    reward: {clip: 1.0, aesthetic: {weight: 0.5, model: head.pth, clip: openai/clip-vit-large-patch14}}
    reward: my_scorer.py:MyScorer             # a plug-in: a file (or package.module:Class) defining a Metric
    reward: http://127.0.0.1:8765             # a reward server (python -m sd3_adrpo.reward_server)

How several scorers combine: r = sum_k w_k r_k per image, then the configured advantages of that one reward (see
``WeightedReward``; docs/rewards.md says why). ``reward_model`` / ``reward_pretrained`` are the weights of the
``clip`` / ``open_clip`` entries that name none of their own (what they always were).

Add a reward: subclass ``Metric`` and register it (``@register_reward("my_reward")``, the same registry as
``register_metric``), or name its class by path, with no change to the package.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import numpy as np
import torch

import sd3_adrpo.metrics  # noqa: F401 - registers every scorer of the package
from sd3_adrpo.metrics.base import (METRICS, Metric, ScorerUnavailable, build_metric, call_scorer, metric_class,
                                    register_metric)
from sd3_adrpo.metrics.clip import ClipScore, ClipScoreReward, OpenClipScore
from sd3_adrpo.reward_spec import CLIP_FAMILY, RewardTerm, check_url, is_url, parse_reward

# The reward side of the one registry: the same dict, base class and decorator as the metrics'.
REWARDS = METRICS
Reward = Metric
register_reward = register_metric
OpenClipScoreReward = OpenClipScore

__all__ = ["REWARDS", "Reward", "register_reward", "ClipScoreReward", "OpenClipScoreReward", "RewardTerm",
           "WeightedReward", "parse_reward", "check_reward", "build_reward", "probe_reward"]


def _check_constructor(cls: type, term: RewardTerm) -> None:
    """The options a scorer's __init__ accepts, and its weights where it has no default: checked without a call."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    names = [n for n in params if n != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(term.options) - set(names[1:]) - {"device"})
    if unknown:
        accepted = [n for n in names[1:] if n != "device" and params[n].kind is not params[n].VAR_POSITIONAL]
        raise ValueError(f"{term.spec}: unknown option(s) {unknown}; {cls.__name__} accepts "
                         f"{', '.join(accepted) or 'none'} (and model:, weight:, key:)")
    first = params[names[0]] if names else None
    if term.model is None and first is not None and first.default is inspect.Parameter.empty and not is_url(term.spec):
        raise ValueError(f"{term.spec} needs its weights ({(cls.__doc__ or '').strip().splitlines()[0][:120]}): "
                         f"write {term.spec}@WEIGHTS, or {{{term.spec}: {{weight: 1, model: WEIGHTS}}}} in YAML")


def check_reward(value: Any, reward_model: Optional[str] = None,
                 reward_pretrained: Optional[str] = None) -> list[RewardTerm]:
    """``parse_reward`` plus what can be checked without loading a model: every scorer resolves (a plug-in's file
    imports), its options exist and its required weights are given. Raises ValueError."""
    terms = parse_reward(value, reward_model, reward_pretrained)
    out = []
    for term in terms:
        if is_url(term.spec):
            check_url(term.spec)
        cls = metric_class(term.spec, "reward")
        if term.model is None and reward_model is not None and issubclass(cls, (ClipScore, OpenClipScore)):
            # a CLIP score under another name (clip_score, a registered subclass): reward_model is its CLIP too
            term = RewardTerm(term.spec, term.weight, reward_model, term.options, term.key, "reward_model")
        _check_constructor(cls, term)
        out.append(term)
    return out


def _log_key(scorer: Metric, term: RewardTerm) -> str:
    if term.key:
        return term.key
    if scorer.key:
        return scorer.key
    if term.spec in METRICS:
        return term.spec
    return type(scorer).__name__  # a plug-in named by its path: its class name


class WeightedReward:
    """r = sum_k w_k r_k per image, over the terms' scorers.

    Why the weighted sum of rewards (then the configured group advantages of that one reward), rather than each
    scorer's group advantages summed: every method of the loop (ADRPO's advantages, RAFT's top fraction, DPO's
    pairs, ORW-CFM-W2's exp(tau r)) needs one scalar reward per image, which per-scorer advantages do not define;
    with ``adv_scale: none`` the two are the same number (the group mean is linear); and a scorer that is flat
    within a group (a verifiable reward all groups pass) adds nothing, where normalising it by its own small std
    would turn noise into full-size advantages. Scorers have their own units (CLIP 100 cos ~ 10 within-group std,
    aesthetic ~ 0.3): the trainer logs each scorer's mean and within-group std to choose the weights by."""

    def __init__(self, terms: list[RewardTerm], scorers: list[Metric]):
        self.terms, self.scorers = list(terms), list(scorers)
        self.weights = np.array([t.weight for t in terms], dtype=np.float64)
        self.keys = [_log_key(s, t) for s, t in zip(scorers, terms)]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"reward: two scorers log under the same name {self.keys}; give one a key: in the "
                             "reward mapping")

    def components(self, images, prompts: list[str], metadata: Optional[list[dict]] = None) -> dict[str, np.ndarray]:
        """Each scorer's (B,) float64 scores, checked to be one number per image."""
        out = {}
        for key, term, scorer in zip(self.keys, self.terms, self.scorers):
            scores = call_scorer(scorer, images, prompts, metadata)
            if scores.shape != (len(prompts),):
                raise ValueError(f"reward {term.spec!r} returned shape {tuple(scores.shape)} for {len(prompts)} "
                                 "images; a reward must return one number per image (an array, list or tensor of "
                                 "shape (B,))")
            out[key] = scores
        return out

    def combine(self, components: dict[str, np.ndarray]) -> np.ndarray:
        """sum_k w_k r_k; NaN where any scorer gave a non-finite score (the trainer drops such samples)."""
        stacked = np.stack([np.asarray(components[k], np.float64) for k in self.keys], axis=1)
        total = stacked @ self.weights
        total[~np.isfinite(stacked).all(axis=1)] = np.nan
        return total

    def __call__(self, images, prompts: list[str], metadata: Optional[list[dict]] = None) -> np.ndarray:
        return self.combine(self.components(images, prompts, metadata))

    def clip_scorer(self, weights: Optional[str]) -> Optional[ClipScore]:
        """The CLIP-score scorer of this reward loaded from ``weights``, if it has one (the evaluation reuses it)."""
        for term, scorer in zip(self.terms, self.scorers):
            if isinstance(scorer, ClipScore) and weights is not None and term.model == weights:
                return scorer
        return None

    def describe(self) -> str:
        if len(self.terms) == 1 and self.terms[0].weight == 1:
            return self.keys[0]
        return " + ".join(f"{t.weight:g} * {k}" for t, k in zip(self.terms, self.keys))


def build_reward(reward: Any = "clip", reward_model: Optional[str] = None, device: torch.device | str = "cpu",
                 pretrained: Optional[str] = None, **options) -> WeightedReward:
    """The reward a config's ``reward`` names (with ``reward_model`` / ``pretrained`` for clip-family entries),
    every scorer built on ``device``. ``options`` go to a single scorer's constructor (e.g. ``batch_size``)."""
    terms = check_reward(reward, reward_model, pretrained)
    if options:
        if len(terms) != 1:
            raise ValueError("options apply to a single scorer; give each entry its own in the reward mapping")
        terms = [RewardTerm(terms[0].spec, terms[0].weight, terms[0].model, {**terms[0].options, **options},
                            terms[0].key, terms[0].model_from)]
    scorers = []
    for term in terms:
        scorer = build_metric(term.spec, term.model, device=device, kind="reward", **term.options)
        scorers.append(scorer)
    return WeightedReward(terms, scorers)


def held_out_rewards(reward: WeightedReward, images, prompts: list[str], what: str,
                     metadata: Optional[dict] = None) -> np.ndarray:
    """The reward of held-out images (grids, periodic evaluations), NaN with a warning where the reward is unavailable
    (a reward server down): what is logged then says so, and the training loop's own scoring stops the run.
    ``metadata``: {prompt: the other fields of its row in the held-out file}, for scorers that take them."""
    try:
        rows = [metadata.get(p, {}) for p in prompts] if metadata else None
        return np.asarray(reward(images, prompts, rows), dtype=np.float64)
    except ScorerUnavailable as e:
        print(f"warning: no reward for the {what} ({e}); logged as NaN", flush=True)
        return np.full(len(prompts), np.nan)


def probe_images(n: int = 2, size: int = 64) -> np.ndarray:
    """Tiny dummy images for the start-up check: mid-grey and seeded noise."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[0] = 128
    return images


def probe_reward(reward: WeightedReward, prompts: list[str], metadata: Optional[list[dict]] = None,
                 size: int = 64) -> None:
    """Score two dummy images with each scorer before the first rollout: a scorer that fails, or returns anything but
    one number per image, stops the run here (ValueError naming the scorer and what to fix) instead of after the
    first rollout. Non-finite scores are allowed (the trainer drops such samples)."""
    prompts = (list(prompts) * 2)[:2]
    metadata = (list(metadata) * 2)[:2] if metadata else None
    images = probe_images(2, size)
    for key, term, scorer in zip(reward.keys, reward.terms, reward.scorers):
        what = f"reward {term.spec!r}"
        if ".py:" in term.spec:
            what += f" (class {term.spec.rpartition(':')[2]} in {term.spec.rpartition(':')[0]})"
        try:
            scores = call_scorer(scorer, images, prompts, metadata)
        except Exception as e:  # noqa: BLE001 - any error of a user's scorer, re-raised saying which and where
            raise ValueError(f"{what} failed on 2 dummy {size}x{size} images at start-up: {type(e).__name__}: {e}. "
                             "Its __call__(images, prompts) takes uint8 images (B, H, W, 3) and B prompts") from e
        if scores.shape != (2,):
            raise ValueError(f"{what} returned shape {tuple(scores.shape)} for 2 images at the start-up check; "
                             "__call__(images, prompts) must return one number per image (shape (B,))")
