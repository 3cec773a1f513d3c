"""Per-prompt group advantages: A_i = r_i - mean of r over i's prompt group, then optional scaling and clipping."""

from __future__ import annotations

from typing import Optional

import torch

SCALES = ("none", "group_std", "batch_std")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "none",
                     clip: Optional[tuple[float, float]] = None, eps: float = 1e-6) -> torch.Tensor:
    """Advantages for a flat batch of rewards whose prompt groups are given by ``group_ids`` (any integer labels,
    groups of any size, in any order).

    scale: "none"; "group_std" divides by the group's std (population std, + eps); "batch_std" divides by the std of
    the whole batch of centred advantages. clip=(a_min, a_max) clamps after scaling. Groups must be complete: with
    several processes gather rewards first.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must be 1-D of the same length, got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    rewards = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros_like(counts).index_add_(0, inverse, rewards) / counts
    adv = rewards - means[inverse]
    if scale == "group_std":
        var = torch.zeros_like(counts).index_add_(0, inverse, adv**2) / counts
        adv = adv / (var.sqrt()[inverse] + eps)
    elif scale == "batch_std":
        adv = adv / (adv.pow(2).mean().sqrt() + eps)
    if clip is not None:
        adv = adv.clamp(clip[0], clip[1])
    return adv.float()
