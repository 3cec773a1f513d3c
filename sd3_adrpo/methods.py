"""What each method does with an iteration's rewards: the per-sample loss coefficients (or, for DPO, the pairs).

All methods share the rollout, the reward, the logging and the optimiser; they differ only here and in the loss
(``losses.py``). ``coefficients`` returns (c_cfm, c_w2) for ``losses.adrpo_loss``.
"""

from __future__ import annotations

import math

import torch

METHODS = ("adrpo", "fixed_beta", "orw_cfm_w2", "raft", "dpo")
# Config fields that only some methods read (the methods, then their fields): a run of any other method does not
# depend on them. The advantages are computed and logged for every method, but only ADRPO and its fixed-coefficient
# ablation train on them.
METHOD_KNOBS = {("adrpo", "fixed_beta"): ("beta0", "adv_scale", "adv_clip_min", "adv_clip_max"),
                ("orw_cfm_w2",): ("orw_tau", "orw_alpha"), ("raft",): ("raft_fraction",), ("dpo",): ("dpo_beta",)}


def unused_knobs(method: str) -> set[str]:
    """The other methods' knobs: fields a run of ``method`` ignores."""
    return {k for readers, knobs in METHOD_KNOBS.items() if method not in readers for k in knobs}


def orw_weights(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """exp(tau * r) normalised to mean 1 over the batch (a softmax times n): the same relative weights as
    exp(tau * r), without overflowing at CLIP-score scale (exp(0.5 * 30) ~ 3e6)."""
    return torch.softmax(tau * rewards.double(), dim=0).float() * len(rewards)


def raft_keep(rewards: torch.Tensor, group_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 for the top ceil(fraction * K) samples of each prompt group by reward (ties broken by position), else 0."""
    keep = torch.zeros_like(rewards)
    for g in group_ids.unique():
        idx = (group_ids == g).nonzero().flatten()
        k = max(1, math.ceil(fraction * len(idx)))
        top = torch.argsort(rewards[idx], descending=True, stable=True)[:k]
        keep[idx[top]] = 1.0
    return keep


def dpo_pairs(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor):
    """One (winner, loser) pair per prompt group: its best and worst valid sample. Returns (winners, losers,
    pair weights); a group with fewer than two valid samples or no reward gap gets weight 0."""
    winners, losers, weights = [], [], []
    for g in group_ids.unique(sorted=True):
        idx = (group_ids == g).nonzero().flatten()
        ok = idx[valid[idx]]
        if len(ok) >= 2 and rewards[ok].max() > rewards[ok].min():
            winners.append(int(ok[rewards[ok].argmax()]))
            losers.append(int(ok[rewards[ok].argmin()]))
            weights.append(1.0)
        else:
            winners.append(int(idx[0]))
            losers.append(int(idx[-1]))
            weights.append(0.0)
    return torch.tensor(winners), torch.tensor(losers), torch.tensor(weights)


def coefficients(method: str, rewards: torch.Tensor, advantages: torch.Tensor, group_ids: torch.Tensor,
                 valid: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (c_cfm, c_w2) of the reward-weighted methods; samples that are not ``valid`` get (0, 0)."""
    v = valid.float()
    if method == "adrpo":
        c_cfm, c_w2 = advantages, cfg.beta0 - advantages
    elif method == "fixed_beta":
        c_cfm, c_w2 = advantages, torch.full_like(advantages, cfg.beta0)
    elif method == "orw_cfm_w2":
        w = torch.zeros_like(rewards)
        w[valid] = orw_weights(rewards[valid], cfg.orw_tau)
        c_cfm, c_w2 = w, torch.full_like(rewards, cfg.orw_alpha)
    elif method == "raft":
        keep = torch.zeros_like(rewards)
        keep[valid] = raft_keep(rewards[valid], group_ids[valid], cfg.raft_fraction)
        c_cfm, c_w2 = keep / cfg.raft_fraction, torch.zeros_like(rewards)  # / fraction: the loss scale of plain CFM
    else:
        raise ValueError(f"{method!r} has no per-sample coefficients (methods: {', '.join(METHODS)})")
    return c_cfm * v, c_w2 * v
