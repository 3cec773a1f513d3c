import pytest
import torch

from sd3_adrpo.advantages import group_advantages


def test_uneven_groups_hand_computed():
    # groups (labels need not be contiguous or sorted): 7 -> [1, 3], 2 -> [2, 4, 6], 9 -> [5]
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    groups = torch.tensor([7, 2, 7, 2, 9, 2])
    adv = group_advantages(rewards, groups)
    assert torch.allclose(adv, torch.tensor([-1.0, -2.0, 1.0, 0.0, 0.0, 2.0]))
    clipped = group_advantages(rewards, groups, clip=(-1.5, 0.5))
    assert torch.allclose(clipped, torch.tensor([-1.0, -1.5, 0.5, 0.0, 0.0, 0.5]))


def test_group_std_scaling_gives_unit_std_per_group():
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 3 + [1] * 5 + [2] * 4)[torch.randperm(12, generator=g)]
    rewards = torch.randn(12, generator=g) * 10 + groups.float() * 100
    adv = group_advantages(rewards, groups, scale="group_std")
    for k in range(3):
        a = adv[groups == k]
        assert abs(float(a.mean())) < 1e-5
        assert abs(float(a.std(unbiased=False)) - 1) < 1e-4


def test_batch_std_scaling_and_clip_after_scaling():
    rewards = torch.tensor([0.0, 2.0, 10.0, 30.0])
    groups = torch.tensor([0, 0, 1, 1])
    raw = torch.tensor([-1.0, 1.0, -10.0, 10.0])
    rms = raw.pow(2).mean().sqrt()
    adv = group_advantages(rewards, groups, scale="batch_std")
    assert torch.allclose(adv, raw / rms, atol=1e-5)
    clipped = group_advantages(rewards, groups, scale="batch_std", clip=(-1.0, 1.0))
    assert torch.allclose(clipped, (raw / rms).clamp(-1, 1), atol=1e-5)
    assert clipped.abs().max() <= 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), scale="max")
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
