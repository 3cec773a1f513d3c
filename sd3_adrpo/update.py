"""Step 4 of the loop, the update: each method's loss on a micro-batch, and the optimisation pass they share.

Per-item (sigma, noise) draws are keyed by the item's global index, so an update does not depend on how items are
split into micro-batches or processes; gradient accumulation, clipping and the non-finite guard live in ``optimise``.
"""

from __future__ import annotations

import torch

from sd3_adrpo.config import TrainConfig
from sd3_adrpo.losses import adrpo_loss, dpo_fm_loss, noised, per_sample_mse, sample_sigmas
from sd3_adrpo.models import guide, reference_mode, velocity_fields
from sd3_adrpo.rollout import Rollout, make_generator


def policy_and_reference(transformer, base_transformer, x_t, sigmas, prompt_embeds, pooled, guidance=None,
                         family=None):
    """(v_theta, v_ref, terms) at the same (x_t, sigma, c): the fields the loss compares. v_ref is the same
    transformer with its adapter disabled (``reference_mode`` on the unwrapped module), run through the wrapper,
    which may shard the weights, under no_grad.

    ``guidance=None`` (loss_guidance: conditional): both are the conditional field v_c. ``guidance=(uncond,
    scale)`` (guided): both are the guided field v_u + scale (v_c - v_u) the sampler integrates, v_u from the same
    empty-prompt embedding; the policy's gradient flows through both passes. ``terms`` then holds the per-sample W2
    of each branch (``w2_conditional``, ``w2_unconditional``), for logging. ``family``: the rollout's
    (``rollout.family``, default SD3), how the embeddings condition the transformer; FLUX.1-dev's carries its
    distilled guidance input, so there the conditional field already is the guided one."""
    uncond, scale = guidance if guidance is not None else (None, 1.0)
    with torch.no_grad(), reference_mode(base_transformer):
        ref_c, ref_u = velocity_fields(transformer, x_t, sigmas, prompt_embeds, pooled, uncond, family)
    theta_c, theta_u = velocity_fields(transformer, x_t, sigmas, prompt_embeds, pooled, uncond, family)
    terms = {}
    if theta_u is not None:
        terms = {"w2_conditional": per_sample_mse(theta_c, ref_c).detach(),
                 "w2_unconditional": per_sample_mse(theta_u, ref_u).detach()}
    return guide(theta_c, theta_u, scale), guide(ref_c, ref_u, scale), terms


def fm_batch_loss(transformer, base_transformer, x1, noise, sigmas, prompt_embeds, pooled, c_cfm, c_w2,
                  guidance=None, family=None):
    """c_cfm * CFM + c_w2 * W2 (``losses.adrpo_loss``) on a minibatch of rollout samples, each with its own
    (sigma, noise) draw (ADRPO: c = (A, beta0 - A)), on the fields of ``policy_and_reference``. x1, the noise and the
    target stay fp32; only the transformer's inputs are cast. Returns (loss, per-sample terms: cfm, w2, ...)."""
    x_t, target = noised(x1.float(), noise.float(), sigmas.float())
    v_theta, v_ref, terms = policy_and_reference(transformer, base_transformer, x_t, sigmas, prompt_embeds, pooled,
                                                 guidance, family)
    loss, cfm, w2 = adrpo_loss(v_theta, v_ref, target, c_cfm, c_w2, return_terms=True)
    return loss, {"cfm": cfm, "w2": w2, **terms}


def dpo_batch_loss(transformer, base_transformer, x_w, x_l, noise, sigmas, emb_w, emb_l, pooled_w, pooled_l,
                   beta: float, weights, guidance=None, family=None):
    """Diffusion-DPO on (winner, loser) pairs, each pair sharing its (sigma, noise), with the errors of the fields of
    ``policy_and_reference``. Returns (loss, per-item terms: cfm = the policy's error, w2 = its W2 to the reference,
    ...)."""
    x_t, target = noised(torch.cat([x_w, x_l]).float(), torch.cat([noise, noise]).float(),
                         torch.cat([sigmas, sigmas]).float())
    v_theta, v_ref, terms = policy_and_reference(transformer, base_transformer, x_t, torch.cat([sigmas, sigmas]),
                                                 torch.cat([emb_w, emb_l]), torch.cat([pooled_w, pooled_l]), guidance,
                                                 family)
    e, e_ref = per_sample_mse(v_theta, target), per_sample_mse(v_ref, target)
    (e_w, e_l), (e_w_ref, e_l_ref) = e.chunk(2), e_ref.chunk(2)
    loss = dpo_fm_loss(e_w, e_w_ref, e_l, e_l_ref, beta, weights)
    return loss, {"cfm": e.detach(), "w2": per_sample_mse(v_theta, v_ref).detach(), **terms}


def loss_guidance(cfg: TrainConfig, rollout: Rollout):
    """What ``policy_and_reference`` takes as ``guidance`` under ``cfg.loss_guidance``: None (conditional, or a
    rollout sampled without CFG, as FLUX.1's always are: their guidance is an input of the one pass), else (the
    rollout's empty-prompt embedding, its guidance scale)."""
    if cfg.loss_guidance == "conditional" or rollout.uncond_embeds is None:
        return None
    return rollout.uncond_embeds, rollout.guidance_scale


def loss_noise(cfg: TrainConfig, shape: tuple, key: tuple, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """One (noise, sigma) draw per sample, each from its own generator keyed by the sample's global index, so the
    draws do not depend on micro-batching, on the number of processes, or on which process holds the sample."""
    noise, sigmas = [], []
    for i in indices:
        g = make_generator(*key, i)
        noise.append(torch.randn(shape, generator=g))
        sigmas.append(sample_sigmas(1, cfg.timestep_density, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                    mode_scale=cfg.mode_scale, shift=cfg.timestep_shift, generator=g))
    return torch.stack(noise), torch.cat(sigmas)


def optimise(accelerator, transformer, optimizer, lr_scheduler, cfg: TrainConfig, n_items: int, item_shape: tuple,
             key: tuple, first_index: int, batch_loss) -> dict:
    """``inner_epochs`` shuffled passes over ``n_items`` training items (samples, or DPO pairs) in micro-batches of
    ``cfg.items_per_batch``, with gradient accumulation; returns mean loss terms, grad norm and skip counts.

    ``batch_loss(idx, noise, sigmas) -> (loss, {name: per-item term})``; each term is logged as its mean. Each item
    gets one (sigma, noise) draw keyed by ``key``
    and its global index (``first_index`` is this process's offset), so the update does not depend on how items
    are split into micro-batches or processes. A window whose loss or gradient is not finite on any process is
    skipped by all of them.
    """
    device = accelerator.device
    params = [p for p in transformer.parameters() if p.requires_grad]
    sums = {"loss": 0.0}
    grad_norms, micro_batches, skipped = [], 0, {"nonfinite_loss": 0, "nonfinite_grad": 0}
    window_ok = True
    transformer.train()
    for epoch in range(cfg.inner_epochs):
        order = torch.randperm(n_items, generator=make_generator(*key, epoch, 0))
        noise, sigmas = loss_noise(cfg, item_shape, (*key, epoch, 1), range(first_index, first_index + n_items))
        for start in range(0, n_items, cfg.items_per_batch):
            idx = order[start : start + cfg.items_per_batch]
            with accelerator.accumulate(transformer), accelerator.autocast():
                loss, terms = batch_loss(idx.to(device), noise[idx].to(device), sigmas[idx].to(device))
                if not torch.isfinite(loss):
                    window_ok = False
                    skipped["nonfinite_loss"] += 1
                accelerator.backward(loss)  # always: with several processes, a skipped backward would hang the rest
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                    norm = torch.as_tensor(float(norm))
                    any_bad = accelerator.reduce(torch.tensor(float(not window_ok), device=device), "sum") > 0
                    if accelerator.scaler is not None:
                        # fp16: the GradScaler decides. Its step skips a window whose (unscaled) gradients are not
                        # finite and lowers the scale; it must run every window, or the next unscale_ fails.
                        optimizer.step()
                        if optimizer.step_was_skipped:  # a non-finite loss gives non-finite gradients: skipped too
                            skipped["nonfinite_grad"] += int(not any_bad)
                        else:
                            lr_scheduler.step()
                            grad_norms.append(float(norm))
                    elif not any_bad and torch.isfinite(norm):
                        optimizer.step()
                        lr_scheduler.step()
                        grad_norms.append(float(norm))
                    elif not any_bad:
                        skipped["nonfinite_grad"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    window_ok = True
            sums["loss"] += float(loss.detach())
            for name, values in terms.items():
                sums[name] = sums.get(name, 0.0) + float(values.mean())
            micro_batches += 1
    transformer.eval()
    stats = {k: v / micro_batches for k, v in sums.items()}
    stats.update(skipped, optimizer_steps=len(grad_norms))
    if grad_norms:
        stats["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return stats


def update(accelerator, transformer, base_transformer, optimizer, lr_scheduler, rollout: Rollout,
           coefficients: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, key: tuple,
           first_index: int = 0) -> dict:
    """The update of the reward-weighted methods: per-sample loss c_cfm * CFM + c_w2 * W2 over the rollout."""
    c_cfm, c_w2 = (c.to(rollout.latents.device) for c in coefficients)
    r, guidance = rollout, loss_guidance(cfg, rollout)

    def batch_loss(idx, noise, sigmas):
        return fm_batch_loss(transformer, base_transformer, r.latents[idx], noise, sigmas,
                             r.prompt_embeds[idx], r.pooled_embeds[idx], c_cfm[idx], c_w2[idx], guidance, r.family)

    return optimise(accelerator, transformer, optimizer, lr_scheduler, cfg, len(r.prompts),
                    tuple(r.latents.shape[1:]), key, first_index, batch_loss)


def update_dpo(accelerator, transformer, base_transformer, optimizer, lr_scheduler, rollout: Rollout,
               pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cfg: TrainConfig, key: tuple,
               first_index: int = 0) -> dict:
    """The DPO update over (winner, loser, weight) pairs of local sample indices."""
    winners, losers, weights = (p.to(rollout.latents.device) for p in pairs)
    r, guidance = rollout, loss_guidance(cfg, rollout)

    def batch_loss(idx, noise, sigmas):
        w, l = winners[idx], losers[idx]
        return dpo_batch_loss(transformer, base_transformer, r.latents[w], r.latents[l], noise, sigmas,
                              r.prompt_embeds[w], r.prompt_embeds[l], r.pooled_embeds[w], r.pooled_embeds[l],
                              cfg.dpo_beta, weights[idx], guidance, r.family)

    return optimise(accelerator, transformer, optimizer, lr_scheduler, cfg, len(winners),
                    tuple(r.latents.shape[1:]), key, first_index, batch_loss)
