import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sd3_adrpo.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen weight: not part of the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_round_trip_restores_trainables_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _model_and_optimizer(0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 7, model, opt, sched, {"iteration": 7}, keep=2)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))

    other, opt2, sched2 = _model_and_optimizer(1)
    assert load_checkpoint(path, other, opt2, sched2) == {"iteration": 7}
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    assert torch.equal(other[1].weight, model[1].weight) and not torch.equal(other[0].weight, model[0].weight)
    assert sched2.state_dict() == sched.state_dict()
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the next step is the same from both (given the same frozen weights, which come from the base model)
    other[0].weight.data.copy_(model[0].weight)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (other, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    assert torch.equal(other[1].weight, model[1].weight)


def test_keeps_the_newest_k_and_ignores_unfinished_writes(tmp_path):
    model, opt, sched = _model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, sched, {"iteration": step}, keep=2)
    (tmp_path / ".tmp-checkpoint-000005").mkdir()  # a write that died before its rename
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003", "checkpoint-000004"]


def test_manifest_detects_corruption(tmp_path):
    model, opt, sched = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"iteration": 1}, keep=1)
    verify_checkpoint(path)
    data = bytearray((path / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    (path / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="trainable.safetensors is missing or corrupt"):
        verify_checkpoint(path)


def test_package_never_unpickles_or_trusts_remote_code():
    """Everything we read in torch's pickle format goes through weights_only=True; no trust_remote_code."""
    for path in [*ROOT.glob("sd3_adrpo/**/*.py"), *ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]:
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{i}"
            assert "trust_remote_code=True" not in line, f"{path}:{i}"
