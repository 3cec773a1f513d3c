"""The online ADRPO loop: sample -> score -> advantages -> update, repeated with the current policy.

``train(cfg)`` is the whole program behind ``train_sd3_adrpo.py``; each stage is a small function of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm.auto import tqdm

from sd3_adrpo.advantages import group_advantages
from sd3_adrpo.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from sd3_adrpo.config import ConfigError, TrainConfig
from sd3_adrpo.io import append_jsonl, atomic_write_bytes, image_grid, save_png
from sd3_adrpo.losses import adrpo_fm_loss, noised, sample_sigmas
from sd3_adrpo.models import DTYPES, add_lora, load_pipeline, reference_mode, save_lora
from sd3_adrpo.prompts import PromptSampler, load_prompts
from sd3_adrpo.rewards import build_reward
from sd3_adrpo.rollout import Rollout, SD3Sampler, make_generator

logger = logging.getLogger("sd3_adrpo")

# Independent random streams, all derived from (cfg.seed, iteration, stream).
ROLLOUT_NOISE, LOSS_NOISE, GRID_NOISE = 0, 1, 2


def velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
    """v(x_t, t, c) with SD3's timestep convention t = 1000 * sigma."""
    return transformer(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled, return_dict=False)[0]


def adrpo_batch_loss(transformer, base_transformer, x1, noise, sigmas, prompt_embeds, pooled, advantages,
                     beta0: float):
    """ADRPO loss on a minibatch of rollout samples, each with its own (sigma, noise) draw.

    ``base_transformer`` is the unwrapped module: with its adapter disabled it gives v_ref at the same (x_t, t, c).
    Returns (loss, per-sample CFM term, per-sample W2 term).
    """
    x_t, target = noised(x1, noise, sigmas)
    with torch.no_grad(), reference_mode(base_transformer):
        v_ref = velocity(base_transformer, x_t, sigmas, prompt_embeds, pooled)
    v_theta = velocity(transformer, x_t, sigmas, prompt_embeds, pooled)
    return adrpo_fm_loss(v_theta.float(), v_ref.float(), target.float(), advantages, beta0, return_terms=True)


def update(accelerator, transformer, base_transformer, optimizer, lr_scheduler, rollout: Rollout,
           advantages: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> dict:
    """``inner_epochs`` passes over the rollout in shuffled minibatches; returns mean loss terms and grad norm.

    Each pass draws one (sigma, noise) per sample up front, so the update does not depend on how the samples are
    split into micro-batches (train_batch_size x gradient_accumulation_steps).
    """
    n, device = len(rollout.prompts), rollout.latents.device
    params = [p for p in transformer.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "cfm": 0.0, "w2": 0.0}
    grad_norms, micro_batches = [], 0
    advantages = advantages.to(device)
    transformer.train()
    for _ in range(cfg.inner_epochs):
        order = torch.randperm(n, generator=generator)
        noise = torch.randn(rollout.latents.shape, generator=generator).to(rollout.latents)
        sigmas = sample_sigmas(n, cfg.timestep_density, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                               mode_scale=cfg.mode_scale, shift=cfg.timestep_shift, generator=generator, device=device)
        for start in range(0, n, cfg.train_batch_size):
            idx = order[start : start + cfg.train_batch_size].to(device)
            with accelerator.accumulate(transformer), accelerator.autocast():
                loss, cfm, w2 = adrpo_batch_loss(
                    transformer, base_transformer, rollout.latents[idx], noise[idx], sigmas[idx],
                    rollout.prompt_embeds[idx], rollout.pooled_embeds[idx], advantages[idx], cfg.beta0)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norms.append(float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] += float(loss.detach())
            sums["cfm"] += float(cfm.mean())
            sums["w2"] += float(w2.mean())
            micro_batches += 1
    transformer.eval()
    stats = {k: v / micro_batches for k, v in sums.items()}
    if grad_norms:
        stats["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return stats


def advantage_stats(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Advantages for the update, plus their logged statistics (including the fraction the clip changed)."""
    raw = group_advantages(rewards, group_ids, cfg.adv_scale)
    adv = group_advantages(rewards, group_ids, cfg.adv_scale, clip=cfg.clip_range)
    group_std = torch.stack([rewards[group_ids == g].std(unbiased=False) for g in group_ids.unique()])
    return adv, {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "reward_group_std": float(group_std.mean()),
        "adv_mean": float(adv.mean()), "adv_std": float(adv.std()), "adv_min": float(adv.min()),
        "adv_max": float(adv.max()), "adv_frac_clipped": float((raw != adv).float().mean()),
    }


def sample_grid(sampler: SD3Sampler, reward_fn, prompts: list[str], cfg: TrainConfig, path: Path) -> dict:
    """Held-out prompts x fixed seeds (the same noise every time, so grids are comparable over training)."""
    rollout = sampler.sample(prompts, cfg.sample_images_per_prompt, cfg.resolution,
                             make_generator(cfg.seed, 0, GRID_NOISE))
    save_png(path, image_grid(rollout.images.numpy(), cfg.sample_images_per_prompt))
    return {"eval_reward_mean": float(reward_fn(rollout.images, rollout.prompts).mean())}


def _prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and out.exists():
        logger.warning("overwrite_output_dir: deleting %s", out)
        print(f"overwrite_output_dir is set: deleting the existing {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode())
    return out


def _find_resume_checkpoint(cfg: TrainConfig, out: Path) -> Optional[Path]:
    if cfg.resume_from is None:
        return None
    candidates = list_checkpoints(out / "checkpoints") if cfg.resume_from == "latest" else [Path(cfg.resume_from)]
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
            return path
        except ValueError as e:
            print(f"warning: skipping checkpoint {path}: {e}")
    if cfg.resume_from == "latest":
        raise ConfigError(f"resume_from latest: no valid checkpoint under {out / 'checkpoints'}")
    raise ConfigError(f"resume_from {cfg.resume_from}: checkpoint is corrupt")


def _truncate_metrics(path: Path, iteration: int) -> None:
    """After a resume, drop metric rows the restored state has not reached yet (so the log has no duplicates)."""
    import json

    if path.is_file():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["iteration"] < iteration]
        atomic_write_bytes(path, "".join(r + "\n" for r in rows).encode())


def train(cfg: TrainConfig) -> Path:
    """Run ADRPO as configured; returns ``<output_dir>/final`` (the LoRA, diffusers format)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    # Everything that can fail on bad input fails here, before any model is loaded.
    cfg.validate()
    train_prompts = load_prompts(cfg.train_prompts)
    if cfg.prompts_per_iteration > len(train_prompts):
        raise ConfigError(f"prompts_per_iteration={cfg.prompts_per_iteration} but {cfg.train_prompts} has only "
                          f"{len(train_prompts)} prompts")
    grid_prompts = load_prompts(cfg.eval_prompts)[: cfg.num_sample_prompts] if cfg.eval_prompts else []

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with="wandb" if cfg.report_to == "wandb" else None)
    out = _prepare_output_dir(cfg) if accelerator.is_main_process else Path(cfg.output_dir)
    resume = _find_resume_checkpoint(cfg, out)
    set_seed(cfg.seed)
    device = accelerator.device

    pipe = load_pipeline(cfg.pretrained_model, drop_t5=cfg.drop_t5, dtype=DTYPES[cfg.mixed_precision],
                         revision=cfg.revision).to(device)
    base_transformer = pipe.transformer
    if cfg.gradient_checkpointing:
        base_transformer.enable_gradient_checkpointing()
    params = add_lora(base_transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    total_steps = cfg.num_iterations * cfg.optimizer_steps_per_iteration
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=total_steps * accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(base_transformer, optimizer, lr_scheduler)
    reward_fn = build_reward(cfg.reward, cfg.reward_model, device=device, pretrained=cfg.reward_pretrained)
    sampler = SD3Sampler(pipe, device, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                         max_sequence_length=cfg.t5_length, batch_size=cfg.rollout_batch_size)
    prompt_sampler = PromptSampler(train_prompts, cfg.seed)

    start = 0
    if resume is not None:
        state = load_checkpoint(resume, base_transformer, optimizer, lr_scheduler)
        prompt_sampler.load_state_dict(state["prompt_sampler"])
        start = state["iteration"]
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", start)
        print(f"resumed from {resume} at iteration {start}")
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.wandb_project, config=dataclasses.asdict(cfg))

    bar = tqdm(range(start, cfg.num_iterations), initial=start, total=cfg.num_iterations, desc="ADRPO",
               disable=not accelerator.is_local_main_process)
    if start == 0 and grid_prompts and cfg.sample_every and accelerator.is_main_process:
        sample_grid(sampler, reward_fn, grid_prompts, cfg, out / "samples" / "iter_000000.png")
    for iteration in bar:
        t0 = time.perf_counter()
        prompts = prompt_sampler.next(cfg.prompts_per_iteration)
        rollout = sampler.sample(prompts, cfg.samples_per_prompt, cfg.resolution,  # 1. sample
                                 make_generator(cfg.seed, iteration, ROLLOUT_NOISE))
        t1 = time.perf_counter()
        rewards = reward_fn(rollout.images, rollout.prompts)  # 2. score
        t2 = time.perf_counter()
        advantages, row = advantage_stats(rewards, rollout.group_ids, cfg)  # 3. advantages
        row.update(update(accelerator, transformer, base_transformer, optimizer, lr_scheduler, rollout,  # 4. update
                          advantages, cfg, make_generator(cfg.seed, iteration, LOSS_NOISE)))
        t3 = time.perf_counter()
        done = iteration + 1
        row.update(iteration=iteration, lr=lr_scheduler.get_last_lr()[0], images_per_s=len(rollout.prompts) / (t1 - t0),
                   time_sample=t1 - t0, time_score=t2 - t1, time_update=t3 - t2)
        if accelerator.is_main_process:
            if grid_prompts and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.num_iterations):
                row.update(sample_grid(sampler, reward_fn, grid_prompts, cfg, out / "samples" / f"iter_{done:06d}.png"))
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.num_iterations:
                save_checkpoint(out / "checkpoints", done, base_transformer, optimizer, lr_scheduler,
                                {"iteration": done, "prompt_sampler": prompt_sampler.state_dict()},
                                keep=cfg.checkpoints_total_limit)
            row["time_total"] = time.perf_counter() - t0
            append_jsonl(out / "metrics.jsonl", row)
            accelerator.log(row, step=iteration)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", w2=f"{row['w2']:.2e}")
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"iteration {iteration}: non-finite loss {row['loss']} (try a lower "
                                     "learning_rate or beta0, or mixed_precision bf16 instead of fp16)")

    final = out / "final"
    if accelerator.is_main_process:
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(base_transformer, tmp)
        atomic_write_bytes(tmp / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        print(f"done: LoRA saved to {final}")
    accelerator.end_training()
    return final
