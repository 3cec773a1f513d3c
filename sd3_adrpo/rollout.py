"""Rollouts from the current policy: cached prompt embeddings, an Euler ODE sampler with CFG, VAE decoding.

One sampler for every model family (``sd3_adrpo.families``: SD3/SD3.5, FLUX.1, SANA): the family supplies the
prompt encoding, the velocity, the latent shape and the scheduler's sigmas (or, for SANA, its scheduler's steps). It
runs the same arithmetic as the family's stock pipeline (``StableDiffusion3Pipeline.__call__``,
``FluxPipeline.__call__``, ``SanaPipeline.__call__``; tests check latents match) but encodes each
prompt once and reuses it across samples and iterations, and keeps the clean latents x1 that the update trains on
next to the uint8 images that the reward scores: the same samples, never regenerated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from dataclasses import field
from typing import Optional

import numpy as np
import torch

from sd3_adrpo.families import SD3, ModelFamily, family_for_pipeline


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (e.g. seed, iteration, stream): reproducible across devices."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


@dataclass
class Rollout:
    """One iteration's samples, prompt-major: sample i belongs to prompt group ``group_ids[i]``."""

    prompts: list[str]
    group_ids: torch.Tensor  # (B,) int64
    latents: torch.Tensor  # (B, C, h, w) clean x1 in the transformer's (scaled, shifted) latent space, fp32
    images: torch.Tensor  # (B, H, W, 3) uint8, decoded from ``latents``
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_embeds: torch.Tensor  # (B, D)
    guidance_scale: float = 1.0  # the CFG scale the samples were drawn with
    # the sampler's empty-prompt embedding ((L, D), (D,)), the unconditional branch of CFG; None without CFG
    uncond_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    # how the embeddings condition the transformer (and, for FLUX.1-dev, the guidance input the samples were drawn with)
    family: ModelFamily = field(default_factory=lambda: SD3)


class SD3Sampler:
    """Samples from a pipeline's transformer (the policy: whatever adapters are enabled), of any family
    (``families.family_for_pipeline``; the name is historical: SD3 was the first). ``guidance_scale`` is CFG's scale
    for a family with true CFG (SD3), FLUX.1-dev's distilled guidance input otherwise (one pass a step)."""

    def __init__(self, pipe, device: torch.device, *, num_inference_steps: int, guidance_scale: float,
                 max_sequence_length: int, batch_size: int, vae_batch_size: int | None = None):
        self.pipe, self.device = pipe, torch.device(device)
        self.steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.max_sequence_length, self.batch_size = max_sequence_length, batch_size
        self.vae_batch_size = vae_batch_size or batch_size
        self.text_encoders_freed = False
        self.dtype = pipe.transformer.dtype
        self.family = family_for_pipeline(pipe, guidance_scale)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def do_cfg(self) -> bool:
        return self.family.true_cfg and self.guidance_scale > 1.0

    # -- prompts --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) for each prompt, on the sampler's device; each distinct prompt goes through the
        text encoders once.

        Prompts are encoded one at a time, so an embedding does not depend on which other prompts happened to share
        its batch (batched matmuls round differently): a resumed run sees bit-identical embeddings. The cache lives
        in CPU memory (pinned when a GPU is used), so it grows with the prompt set there, not on the GPU (SD3's CLIP
        and T5 context is 2.7 MB a prompt); only the embeddings asked for are moved to the device.
        """
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                if self.text_encoders_freed:
                    raise KeyError(f"prompt {p!r} was not encoded before the text encoders were freed")
                emb, pooled = self.family.encode(self.pipe, p, self.device, self.max_sequence_length)
                self._cache[p] = tuple(self._to_cache(e[0].to(self.dtype)) for e in (emb, pooled))
        return tuple(torch.stack([self._cache[p][i] for p in prompts]).to(self.device, non_blocking=True)
                     for i in (0, 1))

    def _to_cache(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to("cpu")
        return x.pin_memory() if self.device.type == "cuda" else x

    def free_text_encoders(self) -> None:
        """Drop the text encoders (after every prompt the run needs has been embedded) to save memory."""
        import gc

        for name in self.family.text_encoders:
            setattr(self.pipe, name, None)
        self.text_encoders_freed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- sampling -------------------------------------------------------------------------------------------
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return self.family.latent_shape(self.pipe, resolution)

    def sigmas(self, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of the pipeline's scheduler for ``steps``, from a copy (the shared one is untouched)."""
        return self.family.schedule(self.pipe, self.steps, latent_shape, self.device)

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Integrate the policy's ODE from ``noise`` (sigma = 1) to clean latents x1, in chunks of batch_size."""
        transformer = self.pipe.transformer
        timesteps, sigmas = self.sigmas(tuple(noise.shape[1:]))
        if self.do_cfg:
            neg_e, neg_p = self.embed([""])
        out = []
        for s in range(0, noise.shape[0], self.batch_size):
            x = noise[s : s + self.batch_size].to(self.device, torch.float32)  # the state stays fp32
            sched = None if self.family.euler else self.family.scheduler(self.pipe, self.steps, self.device)
            e, p = prompt_embeds[s : s + self.batch_size], pooled[s : s + self.batch_size]
            if self.do_cfg:
                e = torch.cat([neg_e.expand_as(e), e])
                p = torch.cat([neg_p.expand_as(p), p])
            for i, t in enumerate(timesteps):
                inp = (torch.cat([x, x]) if self.do_cfg else x).to(self.dtype)  # only the input is cast
                v = self.family.forward(transformer, inp, t.expand(inp.shape[0]), e, p)
                if self.do_cfg:
                    v_uncond, v_text = v.chunk(2)
                    v = v_uncond + self.guidance_scale * (v_text - v_uncond)
                if sched is None:  # Euler step in fp32, as FlowMatchEulerDiscreteScheduler.step does
                    x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
                else:  # the pipeline's own (e.g. multistep) scheduler, a fresh copy for each batch
                    x = sched.step(v.float(), t, x, return_dict=False)[0]
            out.append(x)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> uint8 images (B, H, W, 3), rounded and clamped as the pipeline's postprocessing does."""
        vae = self.pipe.vae
        images = []
        for s in range(0, latents.shape[0], self.vae_batch_size):
            z = self.family.to_vae(vae, latents[s : s + self.vae_batch_size])
            x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
            x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            images.append(x.permute(0, 2, 3, 1).cpu())
        return torch.cat(images)

    def sample(self, prompts: list[str], samples_per_prompt: int, resolution: int,
               generator: torch.Generator | list[torch.Generator] | None = None, *,
               noise: torch.Tensor | None = None) -> Rollout:
        """K = samples_per_prompt images for each prompt (prompt-major). Noise comes from ``generator``, or with a
        list of one generator per prompt, prompt i's K noises from ``generator[i]`` (so a prompt's samples do not
        depend on which other prompts, or which process, it was sampled with); or is given as ``noise``."""
        expanded = [p for p in prompts for _ in range(samples_per_prompt)]
        group_ids = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
        emb, pooled = self.embed(expanded)
        shape = self.latent_shape(resolution)
        if (generator is None) == (noise is None):
            raise ValueError("pass either generator or noise")
        if noise is not None:
            if tuple(noise.shape) != (len(expanded), *shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(len(expanded), *shape)}")
        elif isinstance(generator, torch.Generator):
            noise = torch.randn((len(expanded), *shape), generator=generator)
        else:
            if len(generator) != len(prompts):
                raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
            noise = torch.cat([torch.randn((samples_per_prompt, *shape), generator=g) for g in generator])
        latents = self.denoise(noise, emb, pooled)
        uncond = tuple(e[0] for e in self.embed([""])) if self.do_cfg else None
        return Rollout(prompts=expanded, group_ids=group_ids, latents=latents, images=self.decode(latents),
                       prompt_embeds=emb, pooled_embeds=pooled, guidance_scale=self.guidance_scale,
                       uncond_embeds=uncond, family=self.family)
