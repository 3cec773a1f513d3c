"""The ADRPO flow-matching loss (poster eq. 6) and the SD3 noising convention it is applied under.

Per sample (x1, c) with one (sigma, noise) draw:  x_t = (1 - sigma) x1 + sigma noise,  u_t = noise - x1,

    L = A * ||v_theta - u_t||^2  +  (beta0 - A) * ||v_theta - v_ref||^2

with A detached. Since A + (beta0 - A) = beta0, L equals beta0 * ||v_theta - v*||^2 up to a constant in theta, with
v* = v_ref + (A / beta0) (u_t - v_ref): good samples (A > 0) pull towards their data target, bad ones (A < 0) push
away from it, and the divergence weight (beta0 - A) is largest exactly for the bad ones.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a - b)^2) over every dimension but the first."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def adrpo_fm_terms(v_theta: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (CFM, W2) terms: mean((v_theta - target)^2) and mean((v_theta - v_ref)^2) over non-batch dims."""
    return per_sample_mse(v_theta, target), per_sample_mse(v_theta, v_ref.detach())


def weighted_fm_loss(v_theta: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor, c_cfm: torch.Tensor,
                     c_w2: torch.Tensor | float, return_terms: bool = False):
    """Batch mean of c_cfm * mean((v_theta - target)^2) + c_w2 * mean((v_theta - v_ref)^2), coefficients detached.

    The common form of every reward-weighted method here; each differs only in its per-sample coefficients:
    ADRPO (A, beta0 - A), fixed beta (A, beta0), ORW-CFM-W2 (exp(tau r), alpha), RAFT (top-k indicator, 0).
    With ``return_terms`` also returns the per-sample (CFM, W2) terms, detached, for logging.
    """
    cfm, w2 = adrpo_fm_terms(v_theta, v_ref, target)
    c_cfm = torch.as_tensor(c_cfm).detach().to(cfm)
    c_w2 = torch.as_tensor(c_w2).detach().to(cfm)
    loss = (c_cfm * cfm + c_w2 * w2).mean()
    return (loss, cfm.detach(), w2.detach()) if return_terms else loss


def adrpo_fm_loss(v_theta: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor,
                  beta0: float, return_terms: bool = False, weights: Optional[torch.Tensor] = None):
    """Scalar batch mean of A * mean((v_theta - target)^2) + (beta0 - A) * mean((v_theta - v_ref)^2); A detached.

    ``weights`` (B,) multiplies each sample's loss before the batch mean (0 drops a sample, e.g. one whose reward
    was not finite, without changing the batch arithmetic; its inputs must still be finite). With
    ``return_terms`` also returns the per-sample (CFM, W2) terms, detached, for logging.
    """
    a = advantages.detach().float()
    w = torch.ones_like(a) if weights is None else weights.detach().float().to(a.device)
    return weighted_fm_loss(v_theta, v_ref, target, w * a, w * (beta0 - a), return_terms)


def fixed_beta_loss(v_theta, v_ref, target, advantages: torch.Tensor, beta0: float) -> torch.Tensor:
    """ADRPO's ablation: the divergence coefficient held at beta0, A * CFM + beta0 * W2."""
    return weighted_fm_loss(v_theta, v_ref, target, advantages, beta0)


def orw_cfm_w2_loss(v_theta, v_ref, target, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """ORW-CFM-W2: reward weights w (exp(tau * r), see methods.orw_weights) on CFM plus a fixed alpha * W2."""
    return weighted_fm_loss(v_theta, v_ref, target, weights, alpha)


def raft_loss(v_theta, target, keep: torch.Tensor) -> torch.Tensor:
    """RAFT: plain CFM on the selected samples (``keep`` 0/1, or scaled), no regulariser."""
    return (keep.detach().to(v_theta) * per_sample_mse(v_theta, target)).mean()


def dpo_fm_loss(e_w: torch.Tensor, e_w_ref: torch.Tensor, e_l: torch.Tensor, e_l_ref: torch.Tensor, beta: float,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Diffusion-DPO for flow matching, from per-pair errors e = mean((v - u_t)^2) of the winner (w) and loser (l)
    under the policy and the reference, at a (sigma, noise) shared within each pair:
    mean of -log sigmoid(-beta/2 * [(e_w - e_w_ref) - (e_l - e_l_ref)])."""
    inside = (e_w - e_w_ref.detach()) - (e_l - e_l_ref.detach())
    loss = -torch.nn.functional.logsigmoid(-0.5 * beta * inside)
    if weights is not None:
        loss = loss * weights.detach().to(loss)
    return loss.mean()


def sample_sigmas(n: int, density: str = "uniform", *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29, shift: float = 1.0, generator: Optional[torch.Generator] = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise levels sigma in (0, 1) for the loss, from diffusers' SD3 densities, then an optional shift
    s*u / (1 + (s-1)*u) (the same map SD3's scheduler applies with shift=s)."""
    u = compute_density_for_timestep_sampling(density, n, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, generator=generator)
    u = u.clamp(1e-5, 1 - 1e-5)
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return u.to(device)


def noised(x1: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u_t) under the SD3/diffusers convention: x_t = (1 - sigma) x1 + sigma noise, u_t = noise - x1."""
    s = sigmas.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    return (1 - s) * x1 + s * noise, noise - x1
