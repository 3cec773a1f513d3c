"""Loading a pipeline (SD3/SD3.5 or FLUX.1, hub id or local folder; ``sd3_adrpo.families``), its LoRA, and the
reference velocity.

The reference policy v_ref is the same transformer with its LoRA adapter disabled: no second copy of the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(pretrained_model: str, *, drop_t5: bool = False, dtype: torch.dtype = torch.float32,
                  revision: str | None = None, t5_8bit: bool = False):
    """The pipeline of ``pretrained_model``'s family (``families.family_for_source``: SD3/SD3.5, FLUX.1) with all
    weights frozen; ``drop_t5`` skips SD3's T5 (text_encoder_3), ``t5_8bit`` loads T5 in 8 bit through
    bitsandbytes (CUDA only)."""
    from sd3_adrpo.families import family_for_source

    return family_for_source(pretrained_model, revision).load(pretrained_model, dtype=dtype, revision=revision,
                                                              drop_t5=drop_t5, t5_8bit=t5_8bit)


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
             pooled: torch.Tensor, family=None) -> torch.Tensor:
    """v(x_t, t, c) in fp32 through ``family`` (default SD3, whose timestep convention is t = 1000 * sigma). Only the
    transformer's input is cast to its dtype (the prompt embeddings'): x_t, and whatever the caller computes from the
    result, stay fp32."""
    from sd3_adrpo.families import SD3

    return (family or SD3).velocity(transformer, x_t, sigmas, prompt_embeds, pooled)


def velocity_fields(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                    pooled: torch.Tensor, uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None, family=None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(v_c, v_u): the conditional field and, where ``uncond`` (the empty prompt's (embeds (L, D), pooled (D,)))
    is given, the unconditional one, both from one batched transformer call as the CFG sampler makes it; through
    ``family`` (default SD3; a rollout's is ``rollout.family``)."""
    if uncond is None:
        return velocity(transformer, x_t, sigmas, prompt_embeds, pooled, family), None
    n = len(x_t)
    v = velocity(transformer, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]),
                 torch.cat([uncond[0].expand_as(prompt_embeds), prompt_embeds]),
                 torch.cat([uncond[1].expand_as(pooled), pooled]), family)
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
    """Write the LoRA in the diffusers format of the transformer's pipeline, loadable by its ``load_lora_weights``
    (``StableDiffusion3Pipeline``, ``FluxPipeline``, ...; ``families.family_for_transformer``)."""
    from sd3_adrpo.families import family_for_transformer

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(transformer).items()}
    family_for_transformer(transformer).pipeline_type().save_lora_weights(directory, transformer_lora_layers=state,
                                                                          safe_serialization=True)
