"""Loading the SD3 pipeline (hub id or local folder, with or without T5), its LoRA, and the reference velocity.

The reference policy v_ref is the same transformer with its LoRA adapter disabled: no second copy of the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(pretrained_model: str, *, drop_t5: bool = False, dtype: torch.dtype = torch.float32,
                  revision: str | None = None, t5_8bit: bool = False):
    """``StableDiffusion3Pipeline.from_pretrained`` with all weights frozen; ``drop_t5`` skips T5 (text_encoder_3),
    ``t5_8bit`` loads it in 8 bit through bitsandbytes (CUDA only)."""
    from diffusers import StableDiffusion3Pipeline

    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
    if t5_8bit:
        from transformers import BitsAndBytesConfig, T5EncoderModel

        kwargs["text_encoder_3"] = T5EncoderModel.from_pretrained(
            pretrained_model, subfolder="text_encoder_3", revision=revision,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    pipe = StableDiffusion3Pipeline.from_pretrained(pretrained_model, dtype=dtype, revision=revision, **kwargs)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(transformer, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> list[torch.nn.Parameter]:
    """Attach a fresh LoRA adapter (B = 0, so the policy starts equal to the reference) and return its parameters,
    cast to fp32 for training."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=targets or ["to_q", "to_k", "to_v", "to_out.0"])
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
    """v(x_t, t, c) in fp32, with SD3's timestep convention t = 1000 * sigma. Only the transformer's input is cast
    to its dtype (the prompt embeddings'): x_t, and whatever the caller computes from the result, stay fp32."""
    return transformer(hidden_states=x_t.to(prompt_embeds.dtype), timestep=sigmas * 1000,
                       encoder_hidden_states=prompt_embeds, pooled_projections=pooled, return_dict=False)[0].float()


def velocity_fields(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                    pooled: torch.Tensor, uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(v_c, v_u): the conditional field and, where ``uncond`` (the empty prompt's (embeds (L, D), pooled (D,)))
    is given, the unconditional one, both from one batched transformer call as the CFG sampler makes it."""
    if uncond is None:
        return velocity(transformer, x_t, sigmas, prompt_embeds, pooled), None
    n = len(x_t)
    v = velocity(transformer, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]),
                 torch.cat([uncond[0].expand_as(prompt_embeds), prompt_embeds]),
                 torch.cat([uncond[1].expand_as(pooled), pooled]))
    return v[n:], v[:n]


def guide(v_c: torch.Tensor, v_u: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The classifier-free-guided field v_u + scale (v_c - v_u) that the sampler integrates (v_c without CFG)."""
    return v_c if v_u is None or scale <= 1.0 else v_u + scale * (v_c - v_u)


@contextmanager
def reference_mode(transformer) -> Iterator[None]:
    """Within this block the transformer is the frozen base model (its LoRA adapters disabled)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' LoRA layout (what ``save_lora_weights`` expects)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def save_lora(transformer, directory) -> None:
    """Write the LoRA in diffusers format, loadable by ``StableDiffusion3Pipeline.load_lora_weights(directory)``."""
    from diffusers import StableDiffusion3Pipeline

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(transformer).items()}
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=state, safe_serialization=True)
