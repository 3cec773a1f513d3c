"""The loss's fields under loss_guidance (conditional / guided), checked against direct transformer calls, and the
W2 divergence of the sampled (guided) policy."""

import numpy as np
import pytest
import torch

from sd3_adrpo.evaluation import w2_divergence
from sd3_adrpo.models import add_lora, reference_mode
from sd3_adrpo.rollout import SD3Sampler, make_generator
from sd3_adrpo.update import fm_batch_loss

W = 3.0  # guidance scale


def _call(transformer, x, sigmas, emb, pooled):
    return transformer(hidden_states=x, timestep=sigmas * 1000, encoder_hidden_states=emb, pooled_projections=pooled,
                       return_dict=False)[0]


@pytest.fixture
def setup(tiny_pipe):
    """A policy away from the reference (LoRA B != 0), a CFG rollout of it, and one loss draw per sample."""
    transformer = tiny_pipe.transformer
    torch.manual_seed(0)
    with torch.no_grad():
        for p in add_lora(transformer, rank=4):
            p.add_(torch.randn_like(p) * 0.3)
    sampler = SD3Sampler(tiny_pipe, torch.device("cpu"), num_inference_steps=3, guidance_scale=W,
                         max_sequence_length=4, batch_size=8)
    rollout = sampler.sample(["a red circle", "two blue squares"], 2, 64, make_generator(0, 0, 0))
    g = torch.Generator().manual_seed(1)
    noise, sigmas = torch.randn(rollout.latents.shape, generator=g), torch.rand(4, generator=g)
    coef = (torch.tensor([1.0, -0.5, 0.25, -1.0]), torch.tensor([0.0, 1.5, 0.75, 2.0]))
    return transformer, rollout, noise, sigmas, coef


def _lora_grads(transformer):
    return [p.grad.clone() for p in transformer.parameters() if p.requires_grad]


def test_conditional_loss_is_the_conditional_fields_loss_bit_for_bit(setup):
    transformer, r, noise, sigmas, (c_cfm, c_w2) = setup
    loss, terms = fm_batch_loss(transformer, transformer, r.latents, noise, sigmas, r.prompt_embeds, r.pooled_embeds,
                                c_cfm, c_w2)
    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * r.latents + sigmas.view(-1, 1, 1, 1) * noise
    target = noise - r.latents
    with torch.no_grad():
        v_theta = _call(transformer, x_t, sigmas, r.prompt_embeds, r.pooled_embeds)
        with reference_mode(transformer):
            v_ref = _call(transformer, x_t, sigmas, r.prompt_embeds, r.pooled_embeds)
    cfm = (v_theta - target).pow(2).flatten(1).mean(1)
    w2 = (v_theta - v_ref).pow(2).flatten(1).mean(1)
    assert torch.equal(terms["cfm"], cfm) and torch.equal(terms["w2"], w2)
    assert torch.equal(loss.detach(), (c_cfm * cfm + c_w2 * w2).mean())
    assert set(terms) == {"cfm", "w2"}


def test_guided_loss_trains_both_branches_of_the_guided_field(setup):
    """CFM and W2 on v^g = v_u + w (v_c - v_u) for the policy and the reference; the gradient reaches the LoRA through
    the empty-prompt pass as well (a loss that ignored or detached v_u would give other gradients)."""
    transformer, r, noise, sigmas, (c_cfm, c_w2) = setup
    assert r.guidance_scale == W and r.uncond_embeds is not None
    loss, terms = fm_batch_loss(transformer, transformer, r.latents, noise, sigmas, r.prompt_embeds, r.pooled_embeds,
                                c_cfm, c_w2, (r.uncond_embeds, r.guidance_scale))
    loss.backward()
    ours = _lora_grads(transformer)
    transformer.zero_grad(set_to_none=True)

    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * r.latents + sigmas.view(-1, 1, 1, 1) * noise
    target = noise - r.latents
    neg_e, neg_p = (e.expand_as(f) for e, f in zip(r.uncond_embeds, (r.prompt_embeds, r.pooled_embeds)))

    def fields(detach_uncond=False):
        v_c = _call(transformer, x_t, sigmas, r.prompt_embeds, r.pooled_embeds)
        v_u = _call(transformer, x_t, sigmas, neg_e, neg_p)
        return v_c, (v_u.detach() if detach_uncond else v_u)

    with torch.no_grad(), reference_mode(transformer):
        ref_c, ref_u = fields()
    ref_g = ref_u + W * (ref_c - ref_u)

    def direct(detach_uncond):
        v_c, v_u = fields(detach_uncond)
        v_g = v_u + W * (v_c - v_u)
        cfm = (v_g - target).pow(2).flatten(1).mean(1)
        w2 = (v_g - ref_g).pow(2).flatten(1).mean(1)
        return (c_cfm * cfm + c_w2 * w2).mean(), cfm, w2

    want, cfm, w2 = direct(detach_uncond=False)
    want.backward()
    expected = _lora_grads(transformer)
    transformer.zero_grad(set_to_none=True)
    assert torch.allclose(loss, want, rtol=1e-5)
    assert torch.allclose(terms["cfm"], cfm.detach(), rtol=1e-5) and torch.allclose(terms["w2"], w2.detach(), rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours, expected))
    direct(detach_uncond=True)[0].backward()  # what ignoring the unconditional branch would train
    ignoring = _lora_grads(transformer)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, ignoring)) > 1e-3 * max(
        float(a.abs().max()) for a in ours)
    # both branches' own W2 are logged next to the guided one
    assert terms["w2_conditional"].shape == terms["w2_unconditional"].shape == (4,)
    assert torch.all(terms["w2_unconditional"] > 0)


def test_w2_divergence_of_the_sampled_policy_is_the_guided_fields_distance(setup):
    transformer, r, _, _, _ = setup
    got = w2_divergence(transformer, r, make_generator(5))
    g = make_generator(5)
    noise = torch.randn(r.latents.shape, generator=g)
    sigmas = torch.rand(len(r.latents), generator=g)
    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * r.latents + sigmas.view(-1, 1, 1, 1) * noise
    neg_e, neg_p = (e.expand_as(f) for e, f in zip(r.uncond_embeds, (r.prompt_embeds, r.pooled_embeds)))
    with torch.no_grad():
        fields = {}
        for name, mode in (("theta", False), ("ref", True)):
            if mode:
                transformer.disable_adapters()
            v_c = _call(transformer, x_t, sigmas, r.prompt_embeds, r.pooled_embeds)
            v_u = _call(transformer, x_t, sigmas, neg_e, neg_p)
            transformer.enable_adapters()
            fields[name] = (v_c, v_u, v_u + W * (v_c - v_u))
    mse = lambda a, b: (a - b).pow(2).flatten(1).mean(1).numpy()  # noqa: E731
    assert np.allclose(got["w2_divergence"], mse(fields["theta"][2], fields["ref"][2]), rtol=1e-4)
    assert np.allclose(got["w2_divergence_conditional"], mse(fields["theta"][0], fields["ref"][0]), rtol=1e-4)
    assert np.allclose(got["w2_divergence_unconditional"], mse(fields["theta"][1], fields["ref"][1]), rtol=1e-4)
    assert np.all(got["w2_divergence"] > got["w2_divergence_conditional"])  # guidance amplifies the drift here


def test_fp16_loss_scaling_skips_overflowing_windows_lowers_its_scale_and_keeps_going(monkeypatch):
    """Under a GradScaler (fp16), a window whose scaled gradients overflow must still go through the scaler's step
    (which skips it and lowers the scale); skipping optimizer.step() ourselves made the next window fail with
    'unscale_() has already been called on this optimizer since the last update()'."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from sd3_adrpo.config import make_config
    from sd3_adrpo.update import optimise

    accelerator = Accelerator(cpu=True)
    # fp16's scaler, made to overflow: 2^127 times any gradient above 2 is inf in fp32
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -100)
    accelerator.native_amp = True  # as fp16 on a GPU: clipping unscales the gradients first
    monkeypatch.setattr(type(accelerator), "mixed_precision", property(lambda self: "fp16"))
    monkeypatch.setattr(type(accelerator), "autocast", lambda self: __import__("contextlib").nullcontext())
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    cfg = make_config({"train_batch_size": 2, "inner_epochs": 3, "timestep_density": "uniform"})
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]

    def batch_loss(idx, noise, sigmas):
        out = model(x[idx] * 10).squeeze(-1)
        return (out ** 2).mean(), {"cfm": out.detach() ** 2, "w2": torch.zeros_like(out)}

    stats = optimise(accelerator, model, optimizer, scheduler, cfg, 4, (1,), (0, 0, 1), 0, batch_loss)
    assert stats["nonfinite_grad"] >= 1  # the overflow happened and that window was skipped
    assert stats["optimizer_steps"] >= 1  # later windows, at the lowered scale, were taken
    assert accelerator.scaler.get_scale() < 2.0 ** 127
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
