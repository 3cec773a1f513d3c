"""The tiny world's SD3: a complete ``StableDiffusion3Pipeline`` folder pretrained with rectified flow matching.

Components (the real classes, small sizes):
- ``text_encoder`` / ``text_encoder_2``: two random-init, frozen ``CLIPTextModelWithProjection`` (different seeds) with
  the tiny-world tokenizer (16 tokens); no T5 (``text_encoder_3=None``). Random frozen encoders keep the generator
  independent of the CLIP judge (so the two can be trained at the same time and the judge never shapes the
  generator); ``text_encoders_from_clip`` copies the judge's text tower instead.
- ``vae``: the tiny 8x ``AutoencoderKL`` (``vae.py``): 64 px -> 8x8x16 latents.
- ``transformer``: ``SD3Transformer2DModel``, patch 2 -> 16 image tokens.
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with the shift chosen on the tune split.

Training follows diffusers' train_dreambooth_lora_sd3 conventions: latents = (z - shift_factor) * scaling_factor,
sigma from a logit-normal density, x_t = (1 - sigma) * x1 + sigma * noise, target noise - x1, timestep =
1000 * sigma, plain MSE. Only ``train``-split prompts are used; ~10% of captions are replaced by the empty prompt
(for CFG). Latents of a fixed pool of renders are encoded once (their posterior mean and std; a fresh posterior
sample is drawn each step). Prompt embeddings come from the pipeline's own ``encode_prompt``, as at sampling.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sd3_adrpo.io import atomic_write_bytes

from .grammar import parse, splits
from .oracle import evaluate
from .render import render_batch

SAMPLER_FILE = "tinyworld_sampler.json"  # recommended sampler settings, written into the pipeline folder


@dataclass
class SD3TrainConfig:
    steps: int = 16000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    decay_fraction: float = 0.3  # cosine decay to 10% of lr over the last part of training
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    empty_prompt_prob: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    renders_per_category: int = 5000  # size of the pre-encoded latent pool, per category
    seed: int = 0
    split_seed: int = 0
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    max_sequence_length: int = 4  # zero "T5" tokens appended to the 16 CLIP tokens (none without T5)


@dataclass
class SamplerSettings:
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    shift: float = 3.0
    max_sequence_length: int = 4


def random_text_encoders(tokenizer, seed: int, width: int = 64, layers: int = 2, projection_dim: int = 64):
    """Two frozen random ``CLIPTextModelWithProjection`` (seeds ``seed`` and ``seed + 1``) for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
                            hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    encoders = []
    for k in range(2):
        torch.manual_seed(seed + k)
        encoders.append(CLIPTextModelWithProjection(config).eval().requires_grad_(False))
    return encoders


def text_encoders_from_clip(clip_path: str | Path):
    """Two frozen ``CLIPTextModelWithProjection`` with the weights of the tiny CLIP's text tower and projection."""
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(str(clip_path))
    config = CLIPTextConfig(**{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim})
    encoders = []
    for _ in range(2):
        enc = CLIPTextModelWithProjection(config)
        state = {k: v for k, v in clip.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
        missing, unexpected = enc.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"text tower copy failed: missing {missing}, unexpected {unexpected}")
        encoders.append(enc.eval().requires_grad_(False))
    return encoders


def make_transformer(cfg: SD3TrainConfig, text_width: int, pooled_width: int, latent_size: int = 8):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch_size, in_channels=16, out_channels=16,
        num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=2 * text_width, caption_projection_dim=cfg.num_heads * cfg.head_dim,
        pooled_projection_dim=2 * pooled_width, pos_embed_max_size=latent_size // cfg.patch_size)


def assemble_pipeline(transformer, vae, text_encoders, tokenizer, shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1],
        tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, out: str | Path, sampler: SamplerSettings) -> Path:
    out = Path(out)
    pipe.scheduler.register_to_config(shift=sampler.shift)
    pipe.save_pretrained(out)
    atomic_write_bytes(out / SAMPLER_FILE, (json.dumps(asdict(sampler), indent=2) + "\n").encode())
    return out


def load_sampler_settings(path: str | Path) -> SamplerSettings:
    file = Path(path) / SAMPLER_FILE
    return SamplerSettings(**json.loads(file.read_text())) if file.exists() else SamplerSettings()


def _balanced(rng: np.random.Generator, prompts: list[str], per_category: int) -> list[str]:
    by_category: dict[str, list[str]] = {}
    for p in prompts:
        by_category.setdefault(parse(p).category, []).append(p)
    out = []
    for category in sorted(by_category):
        options = by_category[category]
        out += [options[i] for i in rng.integers(len(options), size=per_category)]
    return out


@torch.no_grad()
def encode_pool(vae, prompts: list[str], seed: int, progress: bool = True, chunk: int = 256):
    """Render each prompt once (seed ``seed``) and return the VAE posterior (mean, std), both (N, 16, 8, 8)."""
    from tqdm.auto import tqdm

    from .vae import to_tensor

    means, stds = [], []
    for s in tqdm(range(0, len(prompts), chunk), desc="encode", disable=not progress, mininterval=5):
        images = render_batch(prompts[s:s + chunk], seed=seed + s)
        dist = vae.encode(to_tensor(images)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _Embedder:
    """Prompt embeddings through the pipeline's own ``encode_prompt`` (one prompt at a time, cached)."""

    def __init__(self, pipe, max_sequence_length: int):
        self.pipe, self.max_sequence_length, self.cache = pipe, max_sequence_length, {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for p in dict.fromkeys(prompts):
            if p not in self.cache:
                emb, _, pooled, _ = self.pipe.encode_prompt(prompt=[p], prompt_2=None, prompt_3=None, device="cpu",
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.max_sequence_length)
                self.cache[p] = (emb[0], pooled[0])
        return torch.stack([self.cache[p][0] for p in prompts]), torch.stack([self.cache[p][1] for p in prompts])


def train_sd3(out: str | Path, vae_path: str | Path, cfg: SD3TrainConfig,
              sampler: SamplerSettings | None = None, progress: bool = True, log_every: int = 100,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, tune_n: int = 0) -> dict:
    """Pretrain the tiny SD3 transformer and save the whole pipeline to ``out`` (EMA weights). Every
    ``checkpoint_every`` steps the raw and EMA transformers are saved under ``checkpoint_dir``. With ``tune_n`` > 0
    the sampler settings are then chosen on ``tune_n`` tune-split prompts (``tune_sampler``), else ``sampler``."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from .tokenizer import build_tokenizer

    start = time.time()
    rng = np.random.default_rng([cfg.seed, 404])
    tokenizer = build_tokenizer()
    text_encoders = random_text_encoders(tokenizer, seed=10_000 + cfg.seed)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(str(vae_path)).eval().requires_grad_(False)
    text_width, pooled_width = text_encoders[0].config.hidden_size, text_encoders[0].config.projection_dim
    transformer = make_transformer(cfg, text_width, pooled_width, latent_size=64 // (2 ** (len(vae.config.block_out_channels) - 1)))
    pipe = assemble_pipeline(transformer, vae, text_encoders, tokenizer, (sampler or SamplerSettings()).shift)
    embed = _Embedder(pipe, cfg.max_sequence_length)

    train_prompts = splits(cfg.split_seed)["train"]
    pool_prompts = _balanced(rng, train_prompts, cfg.renders_per_category)
    means, stds = encode_pool(vae, pool_prompts, seed=5 * 10**6 + cfg.seed * 10**5, progress=progress)
    pool_emb, pool_pooled = embed(pool_prompts)
    empty_emb, empty_pooled = embed([""])
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    encode_s = time.time() - start

    ema = copy.deepcopy(transformer).requires_grad_(False)
    params = [p for p in transformer.parameters()]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))

    def lr_factor(s: int) -> float:
        if s < cfg.warmup:
            return (s + 1) / cfg.warmup
        if s < decay_start:
            return 1.0
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - decay_start) / max(1, cfg.steps - decay_start)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    transformer.train()
    losses, curve = [], []
    train_start = time.time()
    for step in tqdm(range(cfg.steps), desc="sd3", disable=not progress, mininterval=10):
        idx = torch.randint(len(pool_prompts), (cfg.batch_size,), generator=gen)
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        x1 = (z - shift) * scale
        emb, pooled = pool_emb[idx], pool_pooled[idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.empty_prompt_prob
        emb = torch.where(drop[:, None, None], empty_emb, emb)
        pooled = torch.where(drop[:, None], empty_pooled, pooled)
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(cfg.batch_size, generator=gen))
        noise = torch.randn(x1.shape, generator=gen)
        s4 = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s4) * x1 + s4 * noise
        v = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=emb,
                        pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), params):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, float(np.mean(losses[-log_every:]))))
            if progress:
                tqdm.write(f"sd3 step {step + 1}: loss {curve[-1][1]:.4f} ({time.time() - start:.0f}s)")
        if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0:
            for name, model in (("raw", transformer), ("ema", ema)):
                model.save_pretrained(Path(checkpoint_dir) / f"step{step + 1:06d}" / name)
    pipe.register_modules(transformer=ema.eval())
    tuning = []
    if tune_n:
        sampler, tuning = tune_sampler(pipe, n=tune_n, split_seed=cfg.split_seed, progress=progress)
    sampler = sampler or SamplerSettings(max_sequence_length=cfg.max_sequence_length)
    save_pipeline(pipe, out, sampler)
    return {"sampler": asdict(sampler), "sampler_tuning": tuning, "params": n_params, "steps": cfg.steps, "wall_s": time.time() - start, "encode_s": encode_s,
            "train_s": time.time() - train_start, "pool_size": len(pool_prompts), "train_prompts": len(train_prompts),
            "final_loss": float(np.mean(losses[-min(len(losses), log_every):])), "loss_curve": curve,
            "config": asdict(cfg)}


def generate(pipe, prompts: list[str], settings: SamplerSettings, seed: int, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, 64, 64, 3) images, one per prompt, with the project's sampler (``rollout.SD3Sampler``)."""
    from sd3_adrpo.rollout import SD3Sampler, make_generator

    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=settings.shift)
    sampler = SD3Sampler(pipe, "cpu", num_inference_steps=settings.num_inference_steps,
                         guidance_scale=settings.guidance_scale, max_sequence_length=settings.max_sequence_length,
                         batch_size=batch_size)
    return sampler.sample(prompts, 1, 64, make_generator(seed)).images.numpy()


def evaluate_sd3(pipe_or_path, split: str = "heldout", n: int = 400, seed: int = 0,
                 settings: SamplerSettings | None = None, split_seed: int = 0, return_images: bool = False) -> dict:
    """Oracle accuracy of generated images on ``n`` prompts of ``split`` (categories in equal shares)."""
    from sd3_adrpo.models import load_pipeline

    pipe = load_pipeline(str(pipe_or_path), drop_t5=True) if isinstance(pipe_or_path, (str, Path)) else pipe_or_path
    if settings is None:
        settings = load_sampler_settings(pipe_or_path) if isinstance(pipe_or_path, (str, Path)) else SamplerSettings()
    rng = np.random.default_rng([seed, 505])
    prompts = _balanced(rng, splits(split_seed)[split], max(1, n // 4))
    images = generate(pipe, prompts, settings, seed)
    report = evaluate(images, prompts)
    report["settings"] = asdict(settings)
    if return_images:
        report["images"], report["prompts"] = images, prompts
    return report


SAMPLER_GRID = tuple(SamplerSettings(num_inference_steps=20, guidance_scale=g, shift=s)
                     for s in (1.0, 3.0) for g in (3.0, 5.0, 8.0))


def tune_sampler(pipe, grid=SAMPLER_GRID, n: int = 200, seed: int = 77, split_seed: int = 0,
                 progress: bool = True) -> tuple[SamplerSettings, list[dict]]:
    """The sampler settings with the best oracle accuracy on the ``tune`` split (never the held-out one)."""
    results = []
    for settings in grid:
        rep = evaluate_sd3(pipe, split="tune", n=n, seed=seed, settings=settings, split_seed=split_seed)
        results.append({"settings": asdict(settings), "accuracy": rep["accuracy"],
                        "per_category": rep["per_category"]})
        if progress:
            print(f"tune: steps {settings.num_inference_steps} cfg {settings.guidance_scale} shift {settings.shift}: "
                  f"accuracy {rep['accuracy']:.3f} " + str({k: round(v, 3) for k, v in rep["per_category"].items()}))
    best = max(range(len(grid)), key=lambda i: results[i]["accuracy"])
    return grid[best], results
