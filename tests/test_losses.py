import pytest
import torch

from sd3_adrpo.losses import adrpo_loss, noised, sample_sigmas


def adrpo_fm_loss(v, v_ref, target, adv, beta0, weights=None):
    """The loss the loop trains on, with ADRPO's coefficients (A, beta0 - A) (``methods.coefficients``); a weight of
    0 drops a sample, as the loop does for one whose reward is not finite."""
    w = torch.ones_like(adv) if weights is None else weights
    return adrpo_loss(v, v_ref, target, w * adv, w * (beta0 - adv))


def _data(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, 4, 3, 3, generator=g)
    v_ref = torch.randn(b, 4, 3, 3, generator=g)
    target = torch.randn(b, 4, 3, 3, generator=g)
    adv = torch.tensor([2.0, 1.0, 0.0, -0.5, -1.0, -2.0])[:b]
    return v, v_ref, target, adv


def test_value_matches_formula_per_sample():
    v, v_ref, target, adv = _data()
    beta0 = 1.5
    expected = 0.0
    for i in range(len(v)):  # the poster's eq. 6, written out sample by sample
        cfm = ((v[i] - target[i]) ** 2).sum() / v[i].numel()
        w2 = ((v[i] - v_ref[i]) ** 2).sum() / v[i].numel()
        expected += adv[i] * cfm + (beta0 - adv[i]) * w2
    expected /= len(v)
    assert torch.allclose(adrpo_fm_loss(v, v_ref, target, adv, beta0), expected, rtol=1e-6)


def test_identity_beta0_times_distance_to_shifted_target():
    """L(v) = beta0 * mean ||v - v*||^2 + const, v* = v_ref + (A / beta0)(u - v_ref): same gradient, constant gap."""
    v, v_ref, target, adv = _data(1)
    beta0 = 2.0
    a = adv.view(-1, 1, 1, 1)
    v_star = v_ref + a / beta0 * (target - v_ref)

    def identity(x):
        return (beta0 * ((x - v_star) ** 2).flatten(1).mean(1)).mean()

    x = v.clone().requires_grad_(True)
    adrpo_fm_loss(x, v_ref, target, adv, beta0).backward()
    y = v.clone().requires_grad_(True)
    identity(y).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    # The gap between the two is independent of v.
    other = torch.randn_like(v)
    gap1 = adrpo_fm_loss(v, v_ref, target, adv, beta0) - identity(v)
    gap2 = adrpo_fm_loss(other, v_ref, target, adv, beta0) - identity(other)
    assert torch.allclose(gap1, gap2, atol=1e-5)


@pytest.mark.parametrize("a, goal", [(1.0, "target"), (0.0, "ref")])
def test_extremes_regress_to_target_or_reference(a, goal):
    """A = +beta0 is plain CFM towards u_t; A = 0 is pure regression to v_ref."""
    v, v_ref, target, _ = _data(2)
    beta0 = 1.0
    x = v.clone().requires_grad_(True)
    adrpo_fm_loss(x, v_ref, target, torch.full((len(v),), a), beta0).backward()
    aim = target if goal == "target" else v_ref
    expected = 2 * beta0 * (v - aim) / v[0].numel() / len(v)
    assert torch.allclose(x.grad, expected, atol=1e-7)


def test_advantages_and_reference_get_no_gradient():
    v, v_ref, target, adv = _data(3)
    adv = adv.clone().requires_grad_(True)
    v_ref = v_ref.clone().requires_grad_(True)
    x = v.clone().requires_grad_(True)
    adrpo_fm_loss(x, v_ref, target, adv, 1.0).backward()
    assert adv.grad is None and v_ref.grad is None and x.grad is not None


def test_noising_convention_and_sigma_densities():
    x1, noise = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    sig = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    x_t, u = noised(x1, noise, sig)
    assert torch.allclose(x_t[0], x1[0]) and torch.allclose(x_t[-1], noise[-1])
    assert torch.allclose(u, noise - x1)
    for density in ("uniform", "logit_normal", "mode"):
        s = sample_sigmas(4000, density, generator=torch.Generator().manual_seed(0))
        assert s.min() > 0 and s.max() < 1
    u_mean = sample_sigmas(20000, "uniform", generator=torch.Generator().manual_seed(0)).mean()
    shifted = sample_sigmas(20000, "uniform", shift=3.0, generator=torch.Generator().manual_seed(0)).mean()
    assert abs(u_mean - 0.5) < 0.01 and shifted > u_mean + 0.1  # a shift > 1 moves mass towards noise


def test_zero_weight_drops_a_sample():
    v, v_ref, target, adv = _data(4)
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    x = v.clone().requires_grad_(True)
    loss = adrpo_fm_loss(x, v_ref, target, adv, 1.0, weights=weights)
    loss.backward()
    keep = [0, 1, 3, 4, 5]
    expected = adrpo_fm_loss(v[keep], v_ref[keep], target[keep], adv[keep], 1.0) * 5 / 6
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    assert torch.all(x.grad[2] == 0) and torch.all(x.grad[1] != 0)
