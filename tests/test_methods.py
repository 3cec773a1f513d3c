"""The baselines' losses and selections, each against its formula, and each method through the training loop."""


import pytest
import torch

import train_sd3_adrpo
from sd3_adrpo.config import make_config
from sd3_adrpo.losses import adrpo_loss, dpo_fm_loss
from sd3_adrpo.methods import METHODS, coefficients, dpo_pairs, orw_weights, raft_keep, unused_knobs
from sd3_adrpo.trainer import advantage_stats


def _v(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, 3, 3, generator=g) for _ in range(3)]


def _mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


def test_fixed_beta_orw_raft_values_and_gradients():
    v, v_ref, u = _v()
    a = torch.tensor([1.0, -0.5, 0.0, 2.0])
    cases = [
        (lambda x: adrpo_loss(x, v_ref, u, a, 1.5), lambda x: (a * _mse(x, u) + 1.5 * _mse(x, v_ref)).mean()),
        (lambda x: adrpo_loss(x, v_ref, u, a.abs(), 0.7),
         lambda x: (a.abs() * _mse(x, u) + 0.7 * _mse(x, v_ref)).mean()),
        (lambda x: adrpo_loss(x, v_ref, u, torch.tensor([1.0, 0, 0, 1.0]), 0.0),
         lambda x: (_mse(x[[0, 3]], u[[0, 3]])).sum() / 4),
    ]
    for ours, formula in cases:
        x, y = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
        lo, lf = ours(x), formula(y)
        lo.backward(), lf.backward()
        assert torch.allclose(lo, lf) and torch.allclose(x.grad, y.grad, atol=1e-7)


def test_dpo_loss_value_gradient_and_direction():
    e_w, e_w_ref, e_l, e_l_ref = (torch.tensor(x) for x in ([0.5, 0.2], [0.6, 0.2], [0.7, 0.3], [0.6, 0.1]))
    beta = 10.0
    ew = e_w.clone().requires_grad_(True)
    loss = dpo_fm_loss(ew, e_w_ref, e_l, e_l_ref, beta)
    inside = (e_w - e_w_ref) - (e_l - e_l_ref)
    expected = torch.log1p(torch.exp(beta / 2 * inside)).mean()  # -log sigmoid(-z) = log(1 + e^z)
    assert torch.allclose(loss, expected)
    loss.backward()
    # lowering the winner's error below the reference's lowers the loss: the gradient wrt e_w is positive
    assert torch.all(ew.grad > 0)
    assert torch.allclose(ew.grad, beta / 2 * torch.sigmoid(beta / 2 * inside) / 2)
    assert dpo_fm_loss(e_w, e_w_ref, e_l, e_l_ref, beta, weights=torch.tensor([0.0, 0.0])) == 0


def test_orw_weights_are_exp_tau_r_up_to_scale():
    r = torch.tensor([30.0, 31.0, 29.0, 35.0])
    w = orw_weights(r, 0.5)
    assert torch.allclose(w / w[0], torch.exp(0.5 * (r - r[0]))) and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.isfinite(orw_weights(r * 100, 0.5)).all()  # no overflow at large reward scales


def test_raft_keeps_the_top_fraction_of_each_group():
    r = torch.tensor([1.0, 5.0, 3.0, 2.0, 9.0, 8.0, 7.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert raft_keep(r, g, 0.25).tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
    assert raft_keep(r, g, 0.5).tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert raft_keep(r, g, 0.1).sum() == 2  # at least one per group


def test_dpo_pairs_best_vs_worst_and_degenerate_groups():
    r = torch.tensor([1.0, 5.0, 3.0, 2.0, 2.0, 2.0, 4.0, float("nan")])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    valid = torch.isfinite(r)
    w, l, weight = dpo_pairs(r, g, valid)
    assert (w[0], l[0], weight[0]) == (1, 0, 1.0)
    assert weight[1] == 0 and weight[2] == 0  # no reward gap; only one valid sample


def test_coefficients_match_each_method_and_drop_invalid_samples():
    cfg = make_config({"beta0": 2.0, "orw_tau": 0.5, "orw_alpha": 0.3, "raft_fraction": 0.5})
    r = torch.tensor([1.0, 3.0, 2.0, 6.0])
    g = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    valid = torch.tensor([True, True, True, False])
    c, w = coefficients("adrpo", r, a, g, valid, cfg)
    assert c.tolist() == [-1.0, 1.0, -2.0, 0.0] and w.tolist() == [3.0, 1.0, 4.0, 0.0]
    c, w = coefficients("fixed_beta", r, a, g, valid, cfg)
    assert c.tolist() == [-1.0, 1.0, -2.0, 0.0] and w.tolist() == [2.0, 2.0, 2.0, 0.0]
    c, w = coefficients("orw_cfm_w2", r, a, g, valid, cfg)
    assert torch.allclose(c[:3], orw_weights(r[:3], 0.5)) and c[3] == 0
    assert torch.allclose(w, torch.tensor([0.3, 0.3, 0.3, 0.0]))
    c, w = coefficients("raft", r, a, g, valid, cfg)
    assert c.tolist() == [0.0, 2.0, 2.0, 0.0] and w.tolist() == [0.0] * 4
    # the ADRPO coefficients in the loss the loop calls give eq. 6 written out
    v, v_ref, u = _v(1)
    valid = torch.ones(4, dtype=torch.bool)
    c, w = coefficients("adrpo", r, a, g, valid, cfg)
    assert torch.allclose(adrpo_loss(v, v_ref, u, c, w), (a * _mse(v, u) + (2.0 - a) * _mse(v, v_ref)).mean())
    with pytest.raises(ValueError, match="no per-sample coefficients"):
        coefficients("dpo", r, a, g, valid, cfg)


@pytest.mark.parametrize("method", METHODS)
def test_unused_knobs_do_not_change_what_a_method_trains_on(method):
    """What a run of ``method`` trains on (its per-sample coefficients from this iteration's rewards, or for DPO its
    pairs) is unchanged when any knob ``unused_knobs(method)`` names changes, and changes with each knob it reads: the
    reproduction relies on this to keep runs whose method ignores a retuned knob."""
    r = torch.tensor([1.0, 3.0, 2.5, 2.0, 6.0, 4.0, 0.5, 7.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    valid = torch.ones(8, dtype=torch.bool)
    base = {"beta0": 1.0, "adv_scale": "group_std", "adv_clip_min": -1.0, "adv_clip_max": 1.0, "orw_tau": 0.5,
            "orw_alpha": 1.0, "raft_fraction": 0.5, "dpo_beta": 500.0}
    changed = {"beta0": 0.5, "adv_scale": "none", "adv_clip_min": -0.5, "adv_clip_max": 0.5, "orw_tau": 0.1,
               "orw_alpha": 4.0, "raft_fraction": 0.25, "dpo_beta": 2000.0}

    def trains_on(overrides):
        cfg = make_config({**base, **overrides})
        if method == "dpo":  # its pairs, and its loss on fixed per-pair errors
            winners, losers, weights = dpo_pairs(r, g, valid)
            errors = torch.tensor([[0.3, 0.5], [0.4, 0.2], [0.6, 0.1], [0.2, 0.4]])
            return [winners, losers, weights, dpo_fm_loss(*errors, cfg.dpo_beta, weights)]
        advantages, _ = advantage_stats(r, g, valid, cfg)
        return list(coefficients(method, r, advantages, g, valid, cfg))

    reference = trains_on({})
    unused = unused_knobs(method)
    assert unused and unused < set(base)
    for knob, value in changed.items():
        same = all(torch.equal(x, y) for x, y in zip(trains_on({knob: value}), reference))
        assert same == (knob in unused), (method, knob)


@pytest.mark.parametrize("method", ["fixed_beta", "orw_cfm_w2", "raft", "dpo"])
def test_each_method_trains_end_to_end(method, tiny_models, tmp_path):
    from safetensors.torch import load_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "run"
    args = ["--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", "null",
            "--method", method, "--num_iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "4",
            "--train_batch_size", "2", "--num_inference_steps", "3", "--checkpoint_every", "0",
            "--learning_rate", "1e-2", "--output_dir", str(out)]
    assert train_sd3_adrpo.main(args) == 0
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    # DPO: 2 pairs per iteration, 1 pair per micro-batch; the others: 8 samples, 2 per micro-batch
    assert all(f'"optimizer_steps": {2 if method == "dpo" else 4}' in r for r in rows)


def test_method_config_errors():
    from sd3_adrpo.config import ConfigError

    with pytest.raises(ConfigError, match="raft_fraction"):
        make_config({"raft_fraction": 0.0, "pretrained_model": "org/x"}).validate()
    with pytest.raises(ConfigError, match="must be even"):
        make_config({"method": "dpo", "train_batch_size": 3, "pretrained_model": "org/x"}).validate()
    with pytest.raises(ConfigError, match="method must be one of"):
        make_config({"method": "ppo"})
