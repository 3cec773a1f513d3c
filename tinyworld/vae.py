"""The tiny world's VAE: a small ``diffusers.AutoencoderKL`` with SD3's 16 latent channels and 8x downsampling.

64 px renders -> 8x8x16 latents, so the tiny SD3 transformer (patch 2) works on 16 image tokens, like SD3's
8x VAE with patch 2 at 64 px. Trained on fresh renders of the ``train`` split prompts with an L1 + MSE
reconstruction loss and a KL term; ``shift_factor`` and ``scaling_factor`` are then set from latent statistics
(SD3 convention: transformer latents = (z - shift) * scale, about zero mean and unit variance).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .grammar import parse, splits
from .oracle import evaluate
from .render import render_batch


@dataclass
class VaeTrainConfig:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    kl_weight: float = 1e-4  # per latent element, relative to the per-pixel reconstruction loss
    seed: int = 0
    block_out_channels: tuple[int, ...] = (8, 16, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 2  # 8 groups on 8-channel layers is instance norm: it erased colour amplitude


def make_vae(cfg: VaeTrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0, scaling_factor=1.0, sample_size=64,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the pipeline's VAE input range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded and clamped like the pipeline's postprocessing."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, reconstruction) losses for a batch in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
    return rec + kl_weight * kl, rec


def _rng_prompts(rng: np.random.Generator, prompts: list[str], n: int) -> list[str]:
    """Category-balanced draw, so the few colour and counting prompts are not drowned by position prompts."""
    by_category: dict[str, list[str]] = {}
    for p in prompts:
        by_category.setdefault(parse(p).category, []).append(p)
    cats = sorted(by_category)
    return [by_category[cats[c]][rng.integers(len(by_category[cats[c]]))] for c in rng.integers(len(cats), size=n)]


@torch.no_grad()
def set_latent_statistics(vae, prompts: list[str], n: int = 1024, seed: int = 0) -> tuple[float, float]:
    """Set config shift_factor / scaling_factor so that (mean latent - shift) * scale has zero mean, unit std."""
    rng = np.random.default_rng([seed, 55])
    images = render_batch(_rng_prompts(rng, prompts, n), seed=3 * 10**6 + seed)
    z = torch.cat([vae.encode(to_tensor(images[s:s + 128])).latent_dist.mean for s in range(0, n, 128)])
    shift, scale = float(z.mean()), float(1 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def train_vae(out: str | Path, cfg: VaeTrainConfig, progress: bool = True, log_every: int = 100,
              save_every: int = 0, split_seed: int = 0) -> dict:
    """Train the VAE on renders of the train split and save it to ``out``; returns a summary dict."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 202])
    prompts = splits(split_seed)["train"]
    vae = make_vae(cfg)
    n_params = sum(p.numel() for p in vae.parameters())
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))))
    out = Path(out)

    def save() -> None:
        vae.eval()
        set_latent_statistics(vae, prompts, n=256 if cfg.steps < 100 else 1024, seed=cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(out)
        vae.train()

    vae.train()
    start, losses, curve = time.time(), [], []
    for step in tqdm(range(cfg.steps), desc="vae", disable=not progress, mininterval=5):
        images = render_batch(_rng_prompts(rng, prompts, cfg.batch_size), seed=2 * 10**6 + cfg.seed * 10**5 + step)
        loss, rec = vae_loss(vae, to_tensor(images), cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(rec.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, float(np.mean(losses[-log_every:]))))
            if progress:
                tqdm.write(f"vae step {step + 1}: reconstruction loss {curve[-1][1]:.4f} ({time.time() - start:.0f}s)")
        if save_every and (step + 1) % save_every == 0:
            save()
    save()
    vae.eval()
    return {"params": n_params, "steps": cfg.steps, "wall_s": time.time() - start,
            "final_reconstruction_loss": float(np.mean(losses[-min(len(losses), log_every):])),
            "loss_curve": curve, "shift_factor": vae.config.shift_factor,
            "scaling_factor": vae.config.scaling_factor, "config": asdict(cfg)}


@torch.no_grad()
def evaluate_vae(path_or_vae, n: int = 400, seed: int = 0, split_seed: int = 0) -> dict:
    """PSNR (dB, uint8 images) and oracle accuracy of reconstructions (posterior mean) of ``n`` fresh renders of
    held-out prompts, plus the oracle accuracy on the originals for comparison."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path_or_vae)) if isinstance(path_or_vae, (str, Path)) else path_or_vae
    vae.eval()
    rng = np.random.default_rng([seed, 303])
    prompts = _rng_prompts(rng, splits(split_seed)["heldout"], n)
    images = render_batch(prompts, seed=seed)
    recon = np.concatenate([to_uint8(vae.decode(vae.encode(to_tensor(images[s:s + 64])).latent_dist.mean).sample)
                            for s in range(0, n, 64)])
    mse = ((recon.astype(np.float64) - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
    report = evaluate(recon, prompts)
    return {"psnr": psnr, "oracle_accuracy": report["accuracy"], "per_category": report["per_category"],
            "oracle_accuracy_originals": evaluate(images, prompts)["accuracy"], "n": n}
