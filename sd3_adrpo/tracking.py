"""Experiment trackers through accelerate (tensorboard, wandb, or both) and the start-up banner.

The JSONL files (metrics.jsonl, eval_metrics.jsonl) are always written; a tracker gets the same rows plus pictures:
the sample grids and the reward-diversity/divergence trade-off plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from sd3_adrpo.config import TrainConfig

TRACKERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """``Accelerator(**...)`` arguments for ``cfg.report_to``: the trackers, and tensorboard's folder."""
    trackers = TRACKERS[cfg.report_to]
    if not trackers:
        return {"log_with": None}
    return {"log_with": trackers, "project_dir": str(Path(cfg.output_dir) / cfg.logging_dir)}


def tracker_config(run_cfg: TrainConfig) -> dict:
    """The run's settings as trackers take them (tensorboard's hparams accept only scalars and strings)."""
    import dataclasses

    def flat(value):
        if value is None:
            return "null"
        return value if isinstance(value, (bool, int, float, str)) else ",".join(map(str, value))

    return {k: flat(v) for k, v in dataclasses.asdict(run_cfg).items()}


def log_images(accelerator, images: dict[str, np.ndarray], step: int) -> None:
    """Log (H, W, 3) uint8 images to every active tracker, under their names."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)


def banner(cfg: TrainConfig, num_processes: int, output_dir: Optional[str] = None) -> str:
    """What a run will do, in the numbers a user checks first. ``cfg`` is one process's config (after
    ``per_process``): the effective batch and the images are over all processes."""
    clip = cfg.clip_range
    advantages = (f"A = r - group mean{'' if cfg.adv_scale == 'none' else f', / {cfg.adv_scale}'}"
                  + (f", clipped to [{clip[0]:g}, {clip[1]:g}]" if clip else ", not clipped"))
    unit = "pairs" if cfg.method == "dpo" else "samples"
    per_step = cfg.items_per_batch * cfg.gradient_accumulation_steps * num_processes
    images = cfg.samples_per_iteration * num_processes
    steps = cfg.optimizer_steps_per_iteration
    lines = [
        f"sd3-adrpo: {cfg.method} on {cfg.pretrained_model} (LoRA rank {cfg.lora_rank}, "
        f"{'fp32' if cfg.mixed_precision == 'no' else cfg.mixed_precision} weights)",
        f"  reward          {cfg.reward}{f' ({cfg.reward_model})' if 'clip' in str(cfg.reward) else ''}; "
        f"beta0 {cfg.beta0:g}; {advantages}",
        f"  per iteration   {cfg.prompts_per_iteration * num_processes} prompts x {cfg.samples_per_prompt} samples = "
        f"{images} images ({cfg.num_inference_steps} steps, CFG {cfg.guidance_scale:g}, {cfg.resolution} px)",
        f"  effective batch {per_step} {unit} per optimizer step (train_batch_size {cfg.train_batch_size} x "
        f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} x {num_processes} process(es)); "
        f"{steps} optimizer step(s) per iteration (inner_epochs {cfg.inner_epochs})",
        f"  run             {cfg.num_iterations} iterations = {cfg.num_iterations * steps} optimizer steps, "
        f"{cfg.num_iterations * images} images sampled for training",
        f"  output          {output_dir or cfg.output_dir}"
        + (f" (trackers: {', '.join(TRACKERS[cfg.report_to])})" if TRACKERS[cfg.report_to] else ""),
    ]
    return "\n".join(lines)
