"""Model families: what the loop, the rollout, the update and the exports need to know about one kind of diffusers
flow-matching pipeline, and nothing else. SD3/SD3.5 (``StableDiffusion3Pipeline``), FLUX.1 (``FluxPipeline``) and
SANA (``SanaPipeline``) implement it; the family is chosen from the pipeline folder's ``model_index.json``
``_class_name`` (``family_for_source``), or from a loaded pipeline or transformer.

A family answers, for its pipeline:
- ``load``: the pipeline with every weight frozen; ``encode``: one prompt's (sequence, pooled) embeddings, which the
  sampler caches on the CPU; ``text_encoders``: the attributes freed once every prompt is encoded;
- ``forward`` / ``velocity``: v(x_t, sigma, c) on latents in the VAE's (C, h, w) layout (a family that packs its
  latents, as FLUX does, packs and unpacks inside, so rollouts, noise and losses keep one shape);
- ``latent_shape``, ``schedule``: the sampler's latent shape and its scheduler's (timesteps, sigmas) as the stock
  pipeline sets them; ``euler``: whether the sampler's Euler step is the scheduler's (else it steps a fresh copy
  of the pipeline's scheduler, ``scheduler``); ``to_vae``: latents to the VAE's space; ``true_cfg``: whether
  guidance_scale means two-pass classifier-free guidance;
- ``pipeline_class``: whose ``save_lora_weights`` / ``load_lora_weights`` the exported LoRA is for.
The reference is the same transformer with its adapter off (``models.reference_mode``) for every family.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch loads with the models, not with the config check that reads FAMILIES
    import torch


class ModelFamily:
    """The SD3-like defaults; a family overrides what its pipeline does differently."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    sequence_tokenizer = "tokenizer_3"  # the long-sequence encoder's (T5, Gemma): max_sequence_length truncates it
    true_cfg = True  # guidance_scale > 1: v_u + w (v_c - v_u) from the empty prompt's branch
    euler = True  # the sampler's own Euler step on ``schedule``'s sigmas; else a fresh copy of the pipeline's scheduler

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def _freeze(self, pipe):
        for attr in ("transformer", "vae", *self.text_encoders):
            module = getattr(pipe, attr, None)
            if module is not None:
                module.requires_grad_(False).eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- conditioning ---------------------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, device, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (1, L, D), pooled (1, D)) of one prompt."""
        raise NotImplementedError

    # -- the velocity ---------------------------------------------------------------------------------------
    def forward(self, transformer, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """The transformer's output at latents x (B, C, h, w), already in its dtype, and ``timestep`` in the
        scheduler's units (1000 sigma), in the transformer's dtype and (B, C, h, w) layout."""
        raise NotImplementedError

    def velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        """v(x_t, sigma, c) in fp32. Only the transformer's input is cast to its dtype (the embeddings'): x_t, and
        whatever the caller computes from the result, stay fp32."""
        return self.forward(transformer, x_t.to(embeds.dtype), sigmas * 1000, embeds, pooled).float()

    # -- sampling -------------------------------------------------------------------------------------------
    def resolution_multiple(self, pipe) -> int:
        """What an image side must be a multiple of: the VAE's downsampling times the transformer's patch (SD3: 8 x 2;
        FLUX: 8 x its 2 x 2 packing; SANA's DC-AE: 32 x 1)."""
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def check_resolution(self, pipe, resolution: int) -> None:
        """ValueError saying what to use when ``resolution`` does not divide into whole latent patches (the latent
        would otherwise be rounded down and the images come out smaller than asked)."""
        k = self.resolution_multiple(pipe)
        if resolution < k or resolution % k:
            raise ValueError(f"resolution {resolution} does not suit this {type(pipe).__name__}: it must be a multiple "
                             f"of {k} (its VAE's x{pipe.vae_scale_factor} times the transformer's patch), e.g. "
                             f"{max(k, resolution // k * k)}")

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        self.check_resolution(pipe, resolution)
        size = resolution // pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, size, size)

    def image_tokens(self, pipe, latent_shape: tuple[int, ...]) -> int:
        patch = pipe.transformer.config.patch_size
        return (latent_shape[-2] // patch) * (latent_shape[-1] // patch)

    def schedule(self, pipe, steps: int, latent_shape: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of the pipeline's scheduler for ``steps``, from a copy (the shared one is untouched),
        as ``StableDiffusion3Pipeline.__call__`` sets them."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        sched = copy.deepcopy(pipe.scheduler)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            c = sched.config
            kwargs["mu"] = calculate_shift(self.image_tokens(pipe, latent_shape), c.get("base_image_seq_len", 256),
                                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                           c.get("max_shift", 1.16))
        sched.set_timesteps(steps, device=device, **kwargs)
        return sched.timesteps, sched.sigmas.to(device)

    def scheduler(self, pipe, steps: int, device):
        """A fresh copy of the pipeline's scheduler set for ``steps`` (for a family whose sampler steps with it)."""
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(steps, device=device)
        return sched

    def to_vae(self, vae, latents):
        """The transformer's latents in the VAE's space (undo the scaling and shift)."""
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SD3Family(ModelFamily):
    """SD3 and SD3.5: two CLIP encoders (their pooled outputs concatenated) and optional T5, patchified latents."""

    def load(self, pretrained_model: str, *, dtype=None, revision=None, drop_t5=False, t5_8bit=False):
        kwargs = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        if t5_8bit:
            kwargs["text_encoder_3"] = _t5_8bit(pretrained_model, "text_encoder_3", revision)
        return self._freeze(self.pipeline_type().from_pretrained(pretrained_model, dtype=_dtype(dtype),
                                                                 revision=revision, **kwargs))

    def encode(self, pipe, prompt, device, max_sequence_length):
        emb, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=max_sequence_length)
        return emb, pooled

    def forward(self, transformer, x, timestep, embeds, pooled):
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                           return_dict=False)[0]


class FluxFamily(ModelFamily):
    """FLUX.1: T5 sequence + CLIP pooled conditioning, latents packed into 2x2 patches (64 channels a token) with
    their (0, row, col) position ids, the timestep as sigma, and FLUX.1-dev's distilled guidance as a transformer
    input (``guidance``: the sampler's guidance_scale when the transformer has ``guidance_embeds``, None for
    FLUX.1-schnell). One pass per step: true CFG is off (``true_cfg``), so the guided field the sampler integrates is
    the conditional one with the guidance input, and ``loss_guidance`` guided and conditional are the same field."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2")
    sequence_tokenizer = "tokenizer_2"
    true_cfg = False

    def __init__(self, guidance: Optional[float] = None):
        self.guidance = guidance

    def load(self, pretrained_model: str, *, dtype=None, revision=None, drop_t5=False, t5_8bit=False):
        if drop_t5:  # config.validate refuses it for a local folder; a hub id gets here
            raise ValueError("FLUX's text sequence is T5's (text_encoder_2): drop_t5 does not apply; use "
                             "free_text_encoders (prompts encoded once, then the encoders freed) or t5_8bit")
        kwargs = {"text_encoder_2": _t5_8bit(pretrained_model, "text_encoder_2", revision)} if t5_8bit else {}
        return self._freeze(self.pipeline_type().from_pretrained(pretrained_model, dtype=_dtype(dtype),
                                                                 revision=revision, **kwargs))

    def encode(self, pipe, prompt, device, max_sequence_length):
        emb, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                            max_sequence_length=max_sequence_length)
        return emb, pooled

    def forward(self, transformer, x, timestep, embeds, pooled):
        import torch

        b, c, h, w = x.shape
        packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(x.device, x.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = (None if self.guidance is None else
                    torch.full((b,), float(self.guidance), device=x.device, dtype=torch.float32))
        v = transformer(hidden_states=packed, timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0]
        return v.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def resolution_multiple(self, pipe):
        return pipe.vae_scale_factor * 2  # latents are packed in 2 x 2 patches (the transformer's own patch is 1)

    def latent_shape(self, pipe, resolution):
        self.check_resolution(pipe, resolution)
        size = 2 * (resolution // (pipe.vae_scale_factor * 2))
        return (pipe.transformer.config.in_channels // 4, size, size)

    def image_tokens(self, pipe, latent_shape):
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    def schedule(self, pipe, steps, latent_shape, device):
        """FluxPipeline's: sigmas linspace(1, 1/steps), shifted by mu from the packed sequence length."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = copy.deepcopy(pipe.scheduler)
        c = sched.config
        mu = calculate_shift(self.image_tokens(pipe, latent_shape), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
        return sched.timesteps, sched.sigmas.to(device)

    def __repr__(self) -> str:
        return f"FluxFamily(guidance={self.guidance})"


class SanaFamily(ModelFamily):
    """SANA / SANA-1.5: a Gemma-2 sequence with its attention mask (the mask takes the place of a pooled embedding:
    the rollout's second conditioning tensor), the prompt prefixed with the pipeline's default complex human
    instruction as ``SanaPipeline.__call__`` does (the empty prompt of CFG without it, as there), the timestep times
    the transformer's ``timestep_scale``, a DC-AE decoded without a shift factor, and sampling with a fresh copy of the
    pipeline's own scheduler (DPM-Solver++ with flow prediction for SANA), not an Euler step."""

    name = "sana"
    pipeline_class = "SanaPipeline"
    transformer_class = "SanaTransformer2DModel"
    text_encoders = ("text_encoder",)
    sequence_tokenizer = "tokenizer"  # Gemma-2's (its prompt after the instruction prefix gets about as many)
    euler = False

    def load(self, pretrained_model: str, *, dtype=None, revision=None, drop_t5=False, t5_8bit=False):
        if drop_t5 or t5_8bit:
            raise ValueError("SANA has no T5 (its text encoder is Gemma-2): drop_t5 and t5_8bit do not apply")
        return self._freeze(self.pipeline_type().from_pretrained(pretrained_model, dtype=_dtype(dtype),
                                                                 revision=revision))

    @staticmethod
    def instruction(pipe) -> list[str]:
        import inspect

        return inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default

    def encode(self, pipe, prompt, device, max_sequence_length):
        emb, mask, _, _ = pipe.encode_prompt(prompt=[prompt], do_classifier_free_guidance=False, device=device,
                                             max_sequence_length=max_sequence_length,
                                             complex_human_instruction=self.instruction(pipe) if prompt else False)
        return emb, mask

    def forward(self, transformer, x, timestep, embeds, mask):
        config = getattr(transformer, "module", transformer).config  # the update's transformer may be DDP-wrapped
        v = transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                        timestep=timestep * config.timestep_scale, return_dict=False)[0]
        if config.out_channels // 2 == config.in_channels:  # a learned sigma: drop it
            v = v.chunk(2, dim=1)[0]
        return v

    def schedule(self, pipe, steps, latent_shape, device):
        sched = self.scheduler(pipe, steps, device)
        return sched.timesteps, sched.sigmas.to(device)

    def to_vae(self, vae, latents):
        return latents / vae.config.scaling_factor


def _dtype(dtype):
    import torch

    return torch.float32 if dtype is None else dtype


def _t5_8bit(pretrained_model: str, subfolder: str, revision):
    """T5 in 8 bit through bitsandbytes (CUDA only)."""
    from transformers import BitsAndBytesConfig, T5EncoderModel

    return T5EncoderModel.from_pretrained(pretrained_model, subfolder=subfolder, revision=revision,
                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True))


FAMILIES: dict[str, type[ModelFamily]] = {"StableDiffusion3Pipeline": SD3Family, "FluxPipeline": FluxFamily,
                                           "SanaPipeline": SanaFamily}
SD3 = SD3Family()


@functools.lru_cache(maxsize=16)  # a run writes a model card per checkpoint: the index is read once
def pipeline_class_name(pretrained_model: str, revision: Optional[str] = None) -> Optional[str]:
    """``_class_name`` of a pipeline's model_index.json: a local folder's, else the hub's (the local cache when
    offline); None where it cannot be read."""
    index = Path(pretrained_model).expanduser() / "model_index.json"
    try:
        if index.is_file():
            return json.loads(index.read_text()).get("_class_name")
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(pretrained_model, revision=revision).get("_class_name")
    except Exception:  # unreachable or malformed: the loader reports it
        return None


def unsupported_message(class_name: str, what: str) -> str:
    return (f"{what} is a {class_name}, which this trainer cannot train; supported pipelines: "
            f"{', '.join(FAMILIES)} (docs/models.md). Another pipeline can still be a Table 1 row: "
            "eval/table1.py --pipeline LABEL=PATH")


def family_for_source(pretrained_model: str, revision: Optional[str] = None) -> ModelFamily:
    """The family of a pipeline folder or hub id, from its model_index.json (SD3 where it cannot be read)."""
    name = pipeline_class_name(pretrained_model, revision)
    if name is None:
        return SD3Family()
    if name not in FAMILIES:
        raise ValueError(unsupported_message(name, f"pretrained_model {pretrained_model!r}"))
    return FAMILIES[name]()


def family_for_pipeline(pipe, guidance_scale: float = 1.0) -> ModelFamily:
    """The family of a loaded pipeline; FLUX.1-dev's takes ``guidance_scale`` as its distilled guidance input."""
    name = type(pipe).__name__
    if name not in FAMILIES:  # a pipeline-like object (e.g. a benchmark's namespace): its transformer decides
        family = family_for_transformer(pipe.transformer, default=None)
        if family is None:
            raise ValueError(unsupported_message(name, "the pipeline"))
        name = family.pipeline_class
    if FAMILIES[name] is FluxFamily:
        return FluxFamily(guidance_scale if pipe.transformer.config.get("guidance_embeds", False) else None)
    return FAMILIES[name]()


def family_for_transformer(transformer, default: Optional[ModelFamily] = SD3) -> Optional[ModelFamily]:
    """The family whose pipeline holds this transformer class (what a LoRA export is saved for); ``default`` for
    another class."""
    name = type(transformer).__name__
    for family in FAMILIES.values():
        if family.transformer_class == name:
            return family()
    return default
