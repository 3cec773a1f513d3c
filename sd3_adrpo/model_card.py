"""The model card (README.md) beside an exported LoRA, and the upload of that folder to the hub.

The card is built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` (the hub's metadata header, then Markdown):
the base model and its license, the method and its settings, the prompt files, the before/after summary when there is
one, and a usage snippet for that base. A base without T5 (the tiny world, or a run with ``drop_t5``) must be loaded
with ``text_encoder_3=None, tokenizer_3=None`` and sampled with the run's short ``max_sequence_length``: with the
pipeline's default (256) the text context differs from the one the LoRA was trained on and the images come out wrong,
without any error. The snippet says so and passes both.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

from sd3_adrpo.config import TrainConfig, looks_like_path
from sd3_adrpo.io import atomic_write_bytes

# Licenses of bases whose card cannot be read offline: (license, license_name, license_link).
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-3-medium-diffusers": (
        "other", "stabilityai-ai-community",
        "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/blob/main/LICENSE.md"),
    "stabilityai/stable-diffusion-3.5-medium": (
        "other", "stabilityai-ai-community", "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"),
    "stabilityai/stable-diffusion-3.5-large": (
        "other", "stabilityai-ai-community", "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md"),
}

METHOD_NAMES = {"adrpo": "ADRPO (Adaptive Divergence Regularized Policy Optimization)",
                "fixed_beta": "ADRPO's loss with the coefficient held at beta0 (fixed-beta ablation)",
                "orw_cfm_w2": "ORW-CFM-W2 (reward-weighted flow matching with a W2 regulariser)",
                "raft": "RAFT (top fraction of each group, flow-matching loss)",
                "dpo": "Diffusion-DPO adapted to flow matching"}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA for [{{ base_model }}]({{ base_link }}) trained with **{{ method_name }}** by online reinforcement learning
(sample -> score with the reward -> advantages -> update), with [sd3-adrpo](https://arxiv.org/abs/2510.18053).

## Use it

```python
{{ snippet }}
```
{% if no_t5 %}
The base has no T5 text encoder here, so it is loaded with `text_encoder_3=None, tokenizer_3=None`, and
`max_sequence_length={{ max_sequence_length }}` must be passed as in training: with the pipeline's default (256) the
text context is not the one the LoRA was trained on and the images come out wrong (e.g. in wrong colours), silently.
{% endif %}
## Training

| setting | value |
|---|---|
{% for key, value in settings %}| {{ key }} | {{ value }} |
{% endfor %}
Training prompts: `{{ train_prompts }}`.{% if eval_prompts %} Held-out prompts: `{{ eval_prompts }}`.{% endif %}

{% if summary %}## Before and after

{{ summary }}
{% else %}No before/after evaluation was run for this export (set `final_eval_prompts`).
{% endif %}
## License

{{ license_text }}
"""


@functools.lru_cache(maxsize=8)  # a run writes a card per checkpoint: the base's card is read once
def base_license(base: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(license, license_name, license_link) of a base model: from its card's metadata (a local folder's README.md,
    or the hub's where reachable), else from ``KNOWN_LICENSES``; (None, None, None) where unknown."""
    from huggingface_hub import ModelCard

    try:
        if looks_like_path(base):
            readme = Path(base).expanduser() / "README.md"
            data = ModelCard.load(readme).data if readme.is_file() else None
        else:
            data = ModelCard.load(base).data
    except Exception:  # offline, gated, no card: fall back to what is known
        data = None
    if data is not None and data.license:
        return data.license, data.get("license_name"), data.get("license_link")
    return KNOWN_LICENSES.get(base, (None, None, None))


def _pipeline_class(cfg: TrainConfig) -> str:
    """The diffusers pipeline class of the base (its family's, ``sd3_adrpo.families``)."""
    from sd3_adrpo.families import family_for_source

    return family_for_source(cfg.pretrained_model, cfg.revision).pipeline_class


def _no_t5(cfg: TrainConfig) -> bool:
    """True when an SD3 base is used without T5: dropped, or a folder saved without one (FLUX always has T5)."""
    if _pipeline_class(cfg) != "StableDiffusion3Pipeline":
        return False
    if cfg.drop_t5:
        return True
    index = Path(cfg.pretrained_model).expanduser() / "model_index.json"
    if looks_like_path(cfg.pretrained_model) and index.is_file():
        return (json.loads(index.read_text()).get("text_encoder_3") or [None])[0] is None
    return False


def usage_snippet(cfg: TrainConfig, lora: str, prompt: str) -> str:
    """Python that loads the base as the run used it, adds the LoRA and samples with the run's sampler settings."""
    dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(cfg.mixed_precision)
    load_args = [repr(cfg.pretrained_model)]
    if _no_t5(cfg):
        load_args += ["text_encoder_3=None", "tokenizer_3=None"]
    if dtype:
        load_args.append(f"torch_dtype={dtype}")
    call = [repr(prompt), f"num_inference_steps={cfg.num_inference_steps}", f"guidance_scale={cfg.guidance_scale:g}",
            f"height={cfg.resolution}", f"width={cfg.resolution}"]
    if _no_t5(cfg) or cfg.max_sequence_length is not None or _pipeline_class(cfg) != "StableDiffusion3Pipeline":
        # FLUX's and SANA's pipelines default to other lengths (512, 300) than the run's 256
        call.append(f"max_sequence_length={cfg.t5_length}")
    device = "cpu" if cfg.cpu else "cuda"
    call.append(f"generator=torch.Generator({device!r}).manual_seed(0)")
    pipeline = _pipeline_class(cfg)
    return "\n".join([
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f"pipe = {pipeline}.from_pretrained({', '.join(load_args)})",
        f"pipe.load_lora_weights({lora!r})",
        f"pipe.to({device!r})",
        f"image = pipe({', '.join(call)}).images[0]",
        'image.save("sample.png")',
    ])


def _summary_markdown(summary: dict) -> str:
    meta, metrics = summary.get("meta", {}), summary.get("metrics", summary)
    head = (f"On {meta['num_prompts']} held-out prompts x {meta['images_per_prompt']} images, the base and the trained "
            "policy from the same noise; differences are trained - base with "
            f"{int(100 * meta.get('level', 0.95))}% bootstrap intervals over prompts.\n\n" if "num_prompts" in meta else "")
    lines = ["| metric | base | trained | difference | interval |", "|---|---|---|---|---|"]
    for name, row in metrics.items():
        if isinstance(row, dict) and "diff" in row:
            lines.append(f"| {name} | {row['before']:.4g} | {row['after']:.4g} | {row['diff']:+.4g} | "
                         f"[{row['ci_low']:+.4g}, {row['ci_high']:+.4g}] |")
    return head + "\n".join(lines)


def _first_prompt(cfg: TrainConfig) -> str:
    from sd3_adrpo.prompts import load_prompts

    for path in (cfg.eval_prompts, cfg.final_eval_prompts, cfg.train_prompts):
        if path and not str(path).startswith("hf://") and Path(path).is_file():
            return load_prompts(path)[0]
    return "a photo of a cat"


def model_card(cfg: TrainConfig, lora: str, summary: Optional[dict] = None, title: Optional[str] = None,
               iteration: Optional[int] = None):
    """The ``huggingface_hub.ModelCard`` of a LoRA trained with ``cfg``; ``lora`` is what the usage snippet passes to
    ``load_lora_weights`` (the folder, or its hub id); ``summary`` the final evaluation's summary.json, if any."""
    from huggingface_hub import ModelCard, ModelCardData

    base = cfg.pretrained_model
    hub_base = not looks_like_path(base)
    license_id, license_name, license_link = base_license(base)
    data = ModelCardData(base_model=base if hub_base else None, library_name="diffusers", license=license_id,
                         license_name=license_name, license_link=license_link, pipeline_tag="text-to-image",
                         tags=["text-to-image", "diffusers", "lora",
                               {"FluxPipeline": "flux", "SanaPipeline": "sana"}.get(_pipeline_class(cfg), "sd3"), "reinforcement-learning",
                               cfg.method,
                               "sd3-adrpo"])
    clip = cfg.clip_range
    settings = [
        ("method", cfg.method), ("reward", f"{cfg.reward} ({cfg.reward_model})"), ("beta0", f"{cfg.beta0:g}"),
        ("advantages", f"group mean baseline, scale {cfg.adv_scale}, "
                       + (f"clipped to [{clip[0]:g}, {clip[1]:g}]" if clip else "not clipped")),
        ("iterations", str(cfg.num_iterations) if iteration is None else f"{iteration} of {cfg.num_iterations}"),
        ("prompts x samples per iteration", f"{cfg.prompts_per_iteration} x {cfg.samples_per_prompt}"),
        ("optimizer", f"{cfg.optimizer}, learning rate {cfg.learning_rate:g} ({cfg.lr_scheduler}), batch "
                      f"{cfg.train_batch_size} x {cfg.gradient_accumulation_steps}, inner epochs {cfg.inner_epochs}"),
        ("LoRA", f"rank {cfg.lora_rank}, alpha {cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank:g}, "
                 f"on {', '.join(cfg.lora_targets)}"),
        ("rollout sampler", f"{cfg.num_inference_steps} "
                            + ("steps of the pipeline's scheduler" if _pipeline_class(cfg) == "SanaPipeline" else
                               "Euler steps") + ", "
                            + (f"CFG {cfg.guidance_scale:g}" if _pipeline_class(cfg) != "FluxPipeline" else
                               f"guidance input {cfg.guidance_scale:g} (FLUX.1-dev's distilled guidance, one pass; "
                               "none on FLUX.1-schnell)") + f", {cfg.resolution} px"),
        ("loss", f"{cfg.loss_guidance} field, sigma density {cfg.timestep_density} (shift {cfg.timestep_shift:g})"),
        ("precision, seed", f"{cfg.mixed_precision}, {cfg.seed}"),
    ]
    if cfg.method == "orw_cfm_w2":
        settings.append(("orw tau, alpha", f"{cfg.orw_tau:g}, {cfg.orw_alpha:g}"))
    elif cfg.method == "raft":
        settings.append(("raft fraction", f"{cfg.raft_fraction:g}"))
    elif cfg.method == "dpo":
        settings.append(("dpo beta", f"{cfg.dpo_beta:g}"))
    if license_id:
        license_text = f"The base model's license applies: `{license_id}`" + (
            f" ({license_name}, {license_link})." if license_name else ".")
    else:
        license_text = f"The base model's license applies (see `{base}`); this card could not read it."
    return ModelCard.from_template(
        data, template_str=TEMPLATE, title=title or f"{cfg.method} LoRA for {base}", base_model=base,
        base_link=f"https://huggingface.co/{base}" if hub_base else base, method_name=METHOD_NAMES[cfg.method],
        snippet=usage_snippet(cfg, lora, _first_prompt(cfg)), no_t5=_no_t5(cfg), max_sequence_length=cfg.t5_length,
        settings=settings, train_prompts=cfg.train_prompts, eval_prompts=cfg.final_eval_prompts or cfg.eval_prompts,
        summary=_summary_markdown(summary) if summary else None, license_text=license_text)


def write_model_card(directory: str | os.PathLike, cfg: TrainConfig, lora: Optional[str] = None,
                     summary: Optional[dict] = None, title: Optional[str] = None,
                     iteration: Optional[int] = None) -> Path:
    """Write ``<directory>/README.md``, the card of the LoRA exported there (``final/``, ``best/``, a checkpoint's
    export); the snippet loads it from ``lora`` (default: the folder's path)."""
    path = Path(directory) / "README.md"
    card = model_card(cfg, str(directory) if lora is None else lora, summary, title, iteration)
    atomic_write_bytes(path, str(card).encode())
    return path


def push_to_hub(directory: str | os.PathLike, cfg: TrainConfig, summary: Optional[dict] = None) -> str:
    """Create (or reuse) the hub repository ``cfg.hub_model_id`` (default: the output folder's name under the logged
    in account) and upload the folder, its card's snippet loading the LoRA from there (the local card keeps loading
    it from the folder). Returns the repository id."""
    import shutil
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(cfg.hub_model_id or Path(cfg.output_dir).resolve().name, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / Path(directory).name
        shutil.copytree(directory, staged)
        write_model_card(staged, cfg, lora=repo_id, summary=summary)
        api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message=f"{cfg.method} LoRA (sd3-adrpo)")
    return repo_id


def publish(final: Path, cfg: TrainConfig, out: Path) -> None:
    """The end of a run: ``final/``'s card again with the before/after summary (``out/summary.json``, when there is
    one), then, with ``push_to_hub``, the upload. A failed upload does not lose the run: it says how to finish it."""
    import sys

    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    if summary is not None:
        write_model_card(final, cfg, lora=str(final), summary=summary)
    if cfg.push_to_hub:
        try:
            repo = push_to_hub(final, cfg, summary)
            print(f"pushed {final} to https://huggingface.co/{repo}")
        except Exception as e:  # network, login, permissions: many kinds, all reported the same way
            print(f"error: could not push {final} to the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                  f"The LoRA and its card are in {final}: log in (`hf auth login`) and upload it with `hf upload "
                  f"{cfg.hub_model_id or '<org/name>'} {final}`", file=sys.stderr)
