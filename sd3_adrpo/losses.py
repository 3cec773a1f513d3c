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


def fm_terms(v_theta: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (CFM, W2) terms: mean((v_theta - target)^2) and mean((v_theta - v_ref)^2) over non-batch dims."""
    return per_sample_mse(v_theta, target), per_sample_mse(v_theta, v_ref.detach())


def adrpo_loss(v_theta: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor, c_cfm: torch.Tensor,
               c_w2: torch.Tensor | float, return_terms: bool = False):
    """The ADRPO loss (poster eq. 6) in coefficient form, the one the loop trains on: batch mean of
    c_cfm * mean((v_theta - target)^2) + c_w2 * mean((v_theta - v_ref)^2), coefficients detached.

    ADRPO's coefficients are (A, beta0 - A); the reward-weighted baselines are the same loss with theirs: fixed beta
    (A, beta0), ORW-CFM-W2 (exp(tau r), alpha), RAFT (top-k indicator, 0). ``methods.coefficients`` computes each
    (a coefficient of 0 drops a sample, e.g. one whose reward was not finite). With ``return_terms`` also returns
    the per-sample (CFM, W2) terms, detached, for logging.
    """
    cfm, w2 = fm_terms(v_theta, v_ref, target)
    c_cfm = torch.as_tensor(c_cfm).detach().to(cfm)
    c_w2 = torch.as_tensor(c_w2).detach().to(cfm)
    loss = (c_cfm * cfm + c_w2 * w2).mean()
    return (loss, cfm.detach(), w2.detach()) if return_terms else loss


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
