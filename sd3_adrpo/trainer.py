"""The online ADRPO loop: sample -> score -> advantages -> update, repeated with the current policy.

``train(cfg)`` is the whole program behind ``train_sd3_adrpo.py``; each stage is a small function of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from sd3_adrpo.advantages import group_advantages
from sd3_adrpo.checkpoint import list_checkpoints, load_checkpoint, restore, save_checkpoint, snapshot, truncate_metrics
from sd3_adrpo.config import ConfigError, TrainConfig
from sd3_adrpo.families import family_for_pipeline
from sd3_adrpo.grids import comparison_grid, prompt_categories, sample_grid, select_grid_prompts
from sd3_adrpo.io import append_jsonl, atomic_write_bytes, atomic_write_json, read_jsonl, replace_folder, save_png
from sd3_adrpo.guards import (AlarmStop, NonFiniteError, RewardUnavailable, StopOnSignal, TrainingInterrupted,
                              check_in_sync)
from sd3_adrpo.methods import coefficients, dpo_pairs
from sd3_adrpo.model_card import publish, write_model_card
from sd3_adrpo.models import DTYPES, add_lora, load_pipeline, reference_mode, save_lora
from sd3_adrpo.metrics import ClipScore, ScorerUnavailable
from sd3_adrpo.monitor import TRAINING, Monitor, image_statistics, parse_alarm
from sd3_adrpo.prompts import (PromptSampler, balanced_subset, load_prompt_records, load_prompts, prompt_metadata,
                               seeded_subset)
from sd3_adrpo.resume import (RunLock, RunStart, apply_optimizer_settings, clear_run_folder, open_run,
                              record_changes)
from sd3_adrpo.rewards import WeightedReward, build_reward, held_out_rewards, probe_reward
from sd3_adrpo.rollout import Rollout, SD3Sampler, make_generator
from sd3_adrpo.tracking import accelerator_kwargs, banner, log_images, tracker_config
from sd3_adrpo.update import update, update_dpo

logger = logging.getLogger("sd3_adrpo")

# Independent random streams, all derived from (cfg.seed, iteration, stream).
ROLLOUT_NOISE, LOSS_NOISE, GRID_NOISE = 0, 1, 2


def score(reward_fn: WeightedReward, rollout: Rollout,
          metadata: Optional[list[dict]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards of the rollout's images (the weighted sum of its scorers), a mask of usable samples (finite reward and
    finite latents), and each scorer's rewards (B, number of scorers) for the logs. ``metadata``: per image, its
    prompt's fields in the prompt file."""
    parts = reward_fn.components(rollout.images, rollout.prompts, metadata)
    rewards = torch.from_numpy(reward_fn.combine(parts)).float()
    per_scorer = torch.from_numpy(np.stack([parts[k] for k in reward_fn.keys], axis=1)).float()
    return rewards, torch.isfinite(rewards) & torch.isfinite(rollout.latents.cpu()).flatten(1).all(1), per_scorer


def scorer_stats(per_scorer: torch.Tensor, keys: list[str], group_ids: torch.Tensor, valid: torch.Tensor) -> dict:
    """Each scorer's mean reward and mean within-group std (over the usable samples): ``reward_<key>_mean`` and
    ``reward_<key>_group_std``, what a weighted reward's weights are chosen by."""
    r, g = per_scorer[valid], group_ids[valid]
    if len(r) == 0:
        return {}
    std = torch.stack([r[g == k].std(dim=0, unbiased=False) for k in g.unique()]).mean(0)
    return {name: float(v) for i, key in enumerate(keys)
            for name, v in ((f"reward_{key}_mean", r[:, i].mean()), (f"reward_{key}_group_std", std[i]))}


def failed_stage(sampled_ok: bool, valid: torch.Tensor, row: dict, weights_ok: bool) -> str:
    """Which stage of the last iteration broke: the weights the update left, the rollout's latents, the rewards, or
    the update's losses and gradients."""
    if not weights_ok:
        return "update: the LoRA weights became non-finite (the step was too large)"
    if not sampled_ok:
        return "sample: every rollout latent was non-finite"
    if not valid.any():
        return "score: every reward was non-finite"
    return (f"update: {row.get('nonfinite_loss', 0)} non-finite losses, {row.get('nonfinite_grad', 0)} non-finite "
            "gradients")


def advantage_stats(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor,
                    cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Advantages for the update (0 where ``valid`` is false), plus their logged statistics."""
    r, g = rewards[valid], group_ids[valid]
    adv = torch.zeros_like(rewards)
    stats = {"n_dropped": int((~valid).sum())}
    if len(r) == 0:
        return adv, stats
    raw = group_advantages(r, g, cfg.adv_scale)
    adv[valid] = group_advantages(r, g, cfg.adv_scale, clip=cfg.clip_range)
    a = adv[valid]
    group_std = torch.stack([r[g == k].std(unbiased=False) for k in g.unique()])
    stats.update({
        "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
        "reward_group_std": float(group_std.mean()),
        "adv_mean": float(a.mean()), "adv_std": float(a.std()) if len(a) > 1 else 0.0, "adv_min": float(a.min()),
        "adv_max": float(a.max()), "adv_frac_clipped": float((raw != a).float().mean()),
    })
    return adv, stats


def export_policy(transformer, run_cfg: TrainConfig, directory: Path) -> None:
    """The policy as a user loads it: the LoRA in diffusers format and the run's config.yaml (from which
    eval/table1.py takes the sampler the run was trained with). ``final/`` and every checkpoint hold one."""
    save_lora(transformer, directory)
    atomic_write_bytes(directory / "config.yaml", yaml.safe_dump(dataclasses.asdict(run_cfg), sort_keys=False).encode())


def _load_pipeline(cfg: TrainConfig):
    """The SD3 pipeline; a hub id that does not resolve (a typo, offline without the cache, gated) is a ConfigError."""
    from sd3_adrpo.config import looks_like_path

    try:
        return load_pipeline(cfg.pretrained_model, drop_t5=cfg.drop_t5, dtype=DTYPES[cfg.mixed_precision],
                             revision=cfg.revision, t5_8bit=cfg.t5_8bit)
    except (OSError, ValueError) as e:
        if looks_like_path(cfg.pretrained_model):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        raise ConfigError(
            f"pretrained_model {cfg.pretrained_model!r} could not be loaded from the hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Check the id's spelling, log in (`hf auth login`) and accept the "
            "model's license if it is gated, " + ("or download it first (HF_HUB_OFFLINE is set, so only the local "
                                                   "cache is read) " if offline else "")
            + "or pass a local diffusers folder") from None


def _prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite_output_dir:
        clear_run_folder(out)
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode())
    return out


def final_evaluation(cfg: TrainConfig, prompts: list[str], sampler: SD3Sampler, base_transformer, clip, judges: dict,
                     out: Path, accelerator, metadata: Optional[dict] = None) -> Optional[dict]:
    """Base (adapter off) and trained policy on the same held-out prompts and noise; writes summary.json/.md.
    Every process evaluates its share of the prompts; the main process gathers them, writes and returns the summary
    (the others return None)."""
    from accelerate.utils import gather_object

    from sd3_adrpo.evaluation import evaluate_policy, merge_shards, write_results

    k, shard = cfg.final_eval_images_per_prompt, (accelerator.process_index, accelerator.num_processes)
    bar = accelerator.is_local_main_process
    with reference_mode(base_transformer):
        base = evaluate_policy(sampler, clip, prompts, k, cfg.resolution, cfg.seed, shard=shard, judges=judges,
                               metadata=metadata,
                               progress="final evaluation: base" if bar else None)
    trained = evaluate_policy(sampler, clip, prompts, k, cfg.resolution, cfg.seed, shard=shard, judges=judges,
                              metadata=metadata,
                              with_w2=True, progress="final evaluation: trained" if bar else None)
    base, trained = (merge_shards(gather_object([ev])) for ev in (base, trained))
    if not accelerator.is_main_process:
        return None
    summary = write_results(out, base, trained, k, extra={"prompts_file": cfg.final_eval_prompts,
                                                          "clip_model": cfg.eval_clip_model})
    grid = comparison_grid(base, trained, k, cfg.seed)  # one picture: base and trained, each tile scored
    save_png(out / "samples" / "eval_base_vs_trained.png", grid)
    log_images(accelerator, {"final_eval/base_vs_trained": grid}, step=cfg.num_iterations)
    print((out / "summary.md").read_text())
    return summary


def trajectory_point(cfg: TrainConfig, prompts: list[str], sampler: SD3Sampler, clip, reward_fn, judges: dict,
                     metadata: Optional[dict] = None) -> dict:
    """One point of the reward / diversity / divergence trade-off (the paper's Figure 3) on held-out prompts, with the
    judges' scores and the image statistics the monitor's alarms watch (``sd3_adrpo.monitor``)."""
    from sd3_adrpo.evaluation import DIVERSITY_DEFAULT, evaluate_policy

    ev = evaluate_policy(sampler, clip, prompts, cfg.eval_images_per_prompt, cfg.resolution, cfg.seed, with_w2=True,
                         metadata=metadata,
                         judges=judges, progress="eval_every")
    rewards = held_out_rewards(reward_fn, ev.images, ev.prompts, "periodic evaluation", metadata)
    point = {"reward": float(torch.as_tensor(rewards).float().nanmean()), "clip_score": float(ev.clip_score.mean()),
             "clip_diversity": float(ev.diversity[DIVERSITY_DEFAULT].mean()),
             **{name: float(values.mean()) for name, values in ev.w2.items()}}
    point.update({f"clip_diversity_{k}": float(v.mean()) for k, v in ev.diversity.items()})
    point.update({key: float(values.mean()) for key, values in ev.judged.items()})
    point.update(image_statistics(ev.images))
    return point


def monitor_prompts(cfg: TrainConfig) -> list[str]:
    """The periodic evaluation's fixed prompt set: eval_num_prompts of eval_prompts, balanced over the prompt
    categories a judge reports (the tiny world's oracle), else a seeded subset; all of them for 0."""
    if not cfg.eval_every:
        return []
    prompts = load_prompts(cfg.eval_prompts)
    if cfg.eval_num_prompts == 0 or cfg.eval_num_prompts >= len(prompts):
        return prompts
    return balanced_subset(prompts, prompt_categories(cfg.judges, prompts), cfg.eval_num_prompts, cfg.seed)


def _plot_monitor(out: Path, monitor: Monitor, judges: dict) -> None:
    """monitor.png: the evaluation's signals and the train_ alarms' (at the iteration after the row's, as alarms
    act), thresholds drawn."""
    from sd3_adrpo.plots import plot_monitor

    rows = read_jsonl(out / "eval_metrics.jsonl") if (out / "eval_metrics.jsonl").is_file() else []
    if monitor.training_alarms and (out / "metrics.jsonl").is_file():
        rows += [{"iteration": r["iteration"] + 1, **{k: v for k, v in r.items() if k.startswith(TRAINING)}}
                 for r in read_jsonl(out / "metrics.jsonl")]
    plot_monitor(rows, monitor.alarms + monitor.training_alarms, out / "monitor",
                 extra=tuple(judges) + ((monitor.keep_best,) if monitor.keep_best else ()))


def _subset(path: Optional[str], n: int, seed: int) -> list[str]:
    """A seeded random subset of n prompts of a file (all of them for n = 0 or n >= its length)."""
    return seeded_subset(load_prompts(path), n, seed) if path else []


def set_aside_best(out: Path, keep_best: Optional[str], monitor: Monitor) -> None:
    """On resume with another keep_best signal: the best/ chosen by the old one is kept, renamed
    best_by_<old>_it<its iteration>/, and best/ is chosen anew from the resume point on (the earlier policies the new
    signal would pick are not on disk)."""
    chosen = out / "best" / "best.json"
    if keep_best is None or not chosen.is_file():
        return
    kept = json.loads(chosen.read_text())
    old = kept["signal"]
    if old == keep_best:
        return
    aside = out / f"best_by_{old.lstrip('-')}{'_lowest' if old.startswith('-') else ''}_it{kept['iteration']}"
    replace_folder(out / "best", aside)
    monitor.best = None
    print(f"keep_best is now {keep_best!r}: the best/ chosen by {old!r} is kept as {aside}; best/ is chosen again "
          "from the evaluations after this resume")


def _warn_long_prompts(pipe, prompts: list[str], max_sequence_length: Optional[int] = None) -> None:
    """Say how many prompts the text encoders will cut short: CLIP's context (SD3, FLUX) and the long-sequence
    encoder's max_sequence_length (T5 of SD3 and FLUX, SANA's Gemma-2), each the tokens it keeps, its specials
    included."""
    family = family_for_pipeline(pipe)
    # the CLIP context (SD3, FLUX; SANA's pipeline has no tokenizer_max_length), then the long-sequence encoder's
    checks = [("the CLIP context", getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_max_length", None)),
              (f"max_sequence_length of {'Gemma-2' if family.name == 'sana' else 'T5'}",
               getattr(pipe, family.sequence_tokenizer, None), max_sequence_length)]
    for what, tokenizer, limit in checks:
        if tokenizer is None or limit is None:  # dropped (drop_t5), not there, or no limit given
            continue
        long = [p for p in prompts if len(tokenizer(p).input_ids) > limit]
        if long:
            print(f"warning: {len(long)} of {len(prompts)} prompts exceed {what} ({limit} tokens) and will be "
                  f"truncated, e.g. {long[0][:80]!r}")


def train(cfg: TrainConfig) -> Path:
    """Run ADRPO as configured; returns ``<output_dir>/final`` (the LoRA, diffusers format). The main process holds
    the run folder's lock (``resume.RunLock``) for the whole run."""
    # Everything that can fail on bad input fails here, before any model is loaded.
    cfg.validate()
    from sd3_adrpo.guards import refuse_sharded_launch  # DeepSpeed / FSDP: exit 2, DDP is the tested path

    refuse_sharded_launch()
    is_main = int(os.environ.get("RANK", "0")) == 0
    start = open_run(cfg, is_main)
    with RunLock(cfg.output_dir) if is_main else nullcontext():
        return _train(cfg, start)


def _train(cfg: TrainConfig, run_start: RunStart) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    try:  # a prompt listed twice with different fields: exit 2, before any model loads
        train_records = load_prompt_records(cfg.train_prompts)
        train_prompts, metadata = [r["prompt"] for r in train_records], prompt_metadata(train_records, cfg.train_prompts)
        held_out_metadata = {}  # the held-out files' fields, for scorers that verify images by them (GenEval-style)
        for path in {cfg.eval_prompts, cfg.final_eval_prompts} - {None}:
            held_out_metadata.update(prompt_metadata(load_prompt_records(path), path))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    grid_prompts = select_grid_prompts(cfg)
    final_prompts = _subset(cfg.final_eval_prompts, cfg.final_eval_num_prompts, cfg.seed)
    traj_prompts = monitor_prompts(cfg)
    resume = run_start.checkpoint

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              **accelerator_kwargs(cfg))
    run_cfg, cfg = cfg, cfg.per_process(accelerator.num_processes)  # the run's settings (saved) and this process's
    if accelerator.is_main_process:
        print(banner(cfg, accelerator.num_processes))
    if cfg.prompts_per_iteration * accelerator.num_processes > len(train_prompts):
        raise ConfigError(f"prompts_per_iteration={cfg.prompts_per_iteration} on {accelerator.num_processes} "
                          f"process(es) needs {cfg.prompts_per_iteration * accelerator.num_processes} distinct prompts "
                          f"per iteration but {cfg.train_prompts} has only {len(train_prompts)}")
    device = accelerator.device
    try:  # the reward first: a plug-in that fails, or answers in the wrong shape, stops here (exit 2)
        reward_fn = build_reward(cfg.reward, cfg.reward_model, device=device, pretrained=cfg.reward_pretrained)
        probe_reward(reward_fn, train_prompts[:2], [metadata[p] for p in train_prompts[:2]], min(cfg.resolution, 64))
    except (ValueError, FileNotFoundError, ScorerUnavailable) as e:
        raise ConfigError(f"reward: {e}" if not str(e).startswith("reward") else str(e)) from None
    print(f"reward: {reward_fn.describe()}")
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)

    pipe = _load_pipeline(cfg)
    try:  # SANA's DC-AE needs multiples of 32, not the 16 the config checks
        family_for_pipeline(pipe, cfg.guidance_scale).check_resolution(pipe, cfg.resolution)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pipe.to(device)
    if accelerator.is_main_process:  # only once the models load: a failed start leaves no config.yaml behind
        _prepare_output_dir(run_cfg)
    accelerator.wait_for_everyone()
    _warn_long_prompts(pipe, train_prompts + grid_prompts + final_prompts + traj_prompts, cfg.t5_length)
    base_transformer = pipe.transformer
    if cfg.gradient_checkpointing:
        base_transformer.enable_gradient_checkpointing()
    params = add_lora(base_transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    total_steps = cfg.num_iterations * cfg.optimizer_steps_per_iteration
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=total_steps * accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(base_transformer, optimizer, lr_scheduler)
    sampler = SD3Sampler(pipe, device, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                         max_sequence_length=cfg.t5_length, batch_size=cfg.rollout_batch_size,
                         vae_batch_size=cfg.vae_batch_size)
    if cfg.free_text_encoders:
        sampler.embed(train_prompts + grid_prompts + final_prompts + traj_prompts + [""])
        sampler.free_text_encoders()
    prompt_sampler = PromptSampler(train_prompts, cfg.seed)
    eval_clip, judges = None, {}
    if traj_prompts or final_prompts:
        from sd3_adrpo.evaluation import build_judges

        eval_clip = reward_fn.clip_scorer(cfg.eval_clip_model) or ClipScore(cfg.eval_clip_model, device=device)
        judges = build_judges(cfg.judges, device)
    best_key = cfg.keep_best.lstrip("-") if cfg.keep_best else None
    monitor = Monitor([parse_alarm(a) for a in cfg.alarms], best_key, bool(cfg.keep_best and cfg.keep_best[0] == "-"),
                      window=cfg.alarm_window)

    start = 0
    if resume is not None:
        state = load_checkpoint(resume, base_transformer, optimizer, lr_scheduler)
        prompt_sampler.load_state_dict(state["prompt_sampler"])
        start = state["iteration"]
        if run_start.changes:  # asked for with allow_config_change: they take effect from here on
            apply_optimizer_settings(optimizer, lr_scheduler, cfg)
            if accelerator.is_main_process:
                record_changes(out, start, run_start.changes)
            print("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in run_start.changes.items()))
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", start)
            truncate_metrics(out / "eval_metrics.jsonl", start + 1)
            if (out / "eval_metrics.jsonl").is_file():  # the monitor's best so far (and base, replaced below)
                monitor.resume(read_jsonl(out / "eval_metrics.jsonl"))
            if monitor.training_alarms and (out / "metrics.jsonl").is_file():  # the train_ alarms' windows
                monitor.resume_training(read_jsonl(out / "metrics.jsonl"))
            set_aside_best(out, cfg.keep_best, monitor)
        print(f"resumed from {resume} at iteration {start}")
    elif run_start.start_over and accelerator.is_main_process:  # a requeued run with no checkpoint yet: from scratch
        truncate_metrics(out / "metrics.jsonl", 0)
        truncate_metrics(out / "eval_metrics.jsonl", 0)
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.wandb_project, config=tracker_config(run_cfg))

    def trainer_state(done: int) -> dict:
        return {"iteration": done, "prompt_sampler": prompt_sampler.state_dict()}

    def export(folder: Path, done: int) -> None:  # a checkpoint's policy as a user loads it, with its model card
        export_policy(base_transformer, run_cfg, folder)
        write_model_card(folder, run_cfg, lora=str(folder.with_name(folder.name.removeprefix(".tmp-"))),
                         title=f"{run_cfg.method} LoRA for {run_cfg.pretrained_model}, iteration {done}", iteration=done)

    def export_best(done: int, value: float) -> None:  # best/: the best policy so far by keep_best
        best, tmp = out / "best", out / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        export_policy(base_transformer, run_cfg, tmp)
        write_model_card(tmp, run_cfg, lora=str(best), iteration=done,
                         title=f"{run_cfg.method} LoRA for {run_cfg.pretrained_model}, best by {cfg.keep_best} "
                               f"(iteration {done})")
        atomic_write_json(tmp / "best.json", {"iteration": done, "signal": cfg.keep_best, "value": value})
        replace_folder(tmp, best)

    def checkpoint(done: int) -> Path:
        return save_checkpoint(out / "checkpoints", done, base_transformer, optimizer, lr_scheduler,
                               trainer_state(done), keep=cfg.checkpoints_total_limit,
                               export=lambda folder: export(folder, done))

    bar = tqdm(range(start, cfg.num_iterations), initial=start, total=cfg.num_iterations, desc=cfg.method,
               disable=not accelerator.is_local_main_process)
    grid_base = None  # the base's grid (images, prompts, rewards): every later grid shows it beside the policy's
    if grid_prompts and accelerator.is_main_process:
        with reference_mode(base_transformer):
            _, image, grid_base = sample_grid(sampler, reward_fn, grid_prompts, cfg,
                                              make_generator(cfg.seed, 0, GRID_NOISE),
                                              out / "samples" / "iter_000000.png" if start == 0 else None,
                                              metadata=held_out_metadata)
        if start == 0:
            log_images(accelerator, {"samples": image}, step=0)
    if start == 0 and accelerator.is_main_process:
        if traj_prompts:
            point, _, _ = monitor.observe(0, trajectory_point(cfg, traj_prompts, sampler, eval_clip, reward_fn, judges,
                                                            held_out_metadata))
            append_jsonl(out / "eval_metrics.jsonl", {"iteration": 0, **point})
            accelerator.log({f"eval_{k}": v for k, v in point.items()}, step=0)
    elif traj_prompts and (cfg.alarms or cfg.keep_best) and accelerator.is_main_process:
        # a resumed run's alarms compare with the base evaluated as this run evaluates (the prompt set, images per
        # prompt and judges may have changed on resume): the same seeds give the same numbers when nothing did
        with reference_mode(base_transformer):
            monitor.base = trajectory_point(cfg, traj_prompts, sampler, eval_clip, reward_fn, judges,
                                            held_out_metadata)
    bad_streak, last_good = 0, None
    final_alarm = None  # a stop alarm at the last evaluation: the run ends as usual, then exits 3
    rank, world, n_prompts = accelerator.process_index, accelerator.num_processes, cfg.prompts_per_iteration

    def any_process(flag: bool) -> bool:  # every process must call it at the same point (a collective)
        return bool(accelerator.reduce(torch.tensor(float(flag), device=device), "max") > 0) if world > 1 else flag

    local = slice(rank * cfg.samples_per_iteration, (rank + 1) * cfg.samples_per_iteration)  # this process's samples
    with StopOnSignal() as stop:
        for iteration in bar:
            t0 = time.perf_counter()
            # the state this iteration starts from; it becomes the last good one if its rollout is finite somewhere
            candidate = snapshot(base_transformer, optimizer, lr_scheduler, trainer_state(iteration))
            # every process draws the same global prompt list and takes its shard; groups stay within a process
            prompts = prompt_sampler.next(n_prompts * world)[rank * n_prompts : (rank + 1) * n_prompts]
            with reference_mode(base_transformer) if cfg.method == "dpo" else nullcontext():  # DPO: offline pairs
                rollout = sampler.sample(prompts, cfg.samples_per_prompt, cfg.resolution,  # 1. sample
                                         [make_generator(cfg.seed, iteration, ROLLOUT_NOISE, rank * n_prompts + i)
                                          for i in range(n_prompts)])
            t1 = time.perf_counter()
            try:  # 2. score
                rewards, valid, per_scorer = score(reward_fn, rollout, [metadata.get(p, {}) for p in rollout.prompts])
                unavailable = None
            except ScorerUnavailable as e:  # never a made-up reward: stop, keeping this iteration's start
                unavailable = str(e)
            if any_process(unavailable is not None):  # on every process, so that a failure on one stops all
                prompt_sampler.load_state_dict(candidate["trainer"]["prompt_sampler"])  # nothing of it was used
                path = checkpoint(iteration) if accelerator.is_main_process else None
                accelerator.wait_for_everyone()
                raise RewardUnavailable(
                    f"stopped at iteration {iteration}: {unavailable or 'the reward failed on another process'}. "
                    f"No reward was made up: the state at the start of iteration {iteration} is saved to "
                    f"{path or out / 'checkpoints'}. Restart the reward server (or fix the reward), then continue "
                    "with --resume_from latest")
            t2 = time.perf_counter()
            # 3. advantages, from all processes' rewards (so batch_std and the logged stats are global)
            all_rewards, all_valid, all_groups, all_per_scorer = (accelerator.gather(x.to(device)).cpu() for x in (
                rewards, valid.float(), rollout.group_ids + rank * n_prompts, per_scorer))  # floats: NCCL gathers no bools
            all_valid = all_valid.bool()
            all_advantages, row = advantage_stats(all_rewards, all_groups, all_valid, cfg)
            row.update(scorer_stats(all_per_scorer, reward_fn.keys, all_groups, all_valid))
            # the weights this iteration started from gave finite samples somewhere: a state worth falling back on
            sampled_ok = bool(accelerator.reduce(torch.isfinite(rollout.latents).flatten(1).all(1).any().float(),
                                                 "sum") > 0)
            if sampled_ok or last_good is None:  # (the run's start stands in until an iteration samples fine)
                last_good = candidate
            if all_valid.any():
                rollout.latents[~valid.to(rollout.latents.device)] = 0.0  # dropped below; keep the arithmetic finite
                key = (cfg.seed, iteration, LOSS_NOISE)
                if cfg.method == "dpo":  # 4. update
                    winners, losers, weights = dpo_pairs(all_rewards[local], rollout.group_ids, all_valid[local])
                    stats = update_dpo(accelerator, transformer, base_transformer, optimizer, lr_scheduler, rollout,
                                       (winners, losers, weights), cfg, key, rank * n_prompts)
                else:
                    c_cfm, c_w2 = coefficients(cfg.method, all_rewards, all_advantages, all_groups, all_valid, cfg)
                    stats = update(accelerator, transformer, base_transformer, optimizer, lr_scheduler, rollout,
                                   (c_cfm[local], c_w2[local]), cfg, key, local.start)
                for k in [k for k in stats if k in ("loss", "nonfinite_loss") or k.startswith(("cfm", "w2"))]:
                    stats[k] = float(accelerator.reduce(torch.tensor(float(stats[k]), device=device),
                                                        "mean" if k != "nonfinite_loss" else "sum"))
                row.update(stats)
                check_in_sync(accelerator, params)
            t3 = time.perf_counter()
            done = iteration + 1
            row.update(iteration=iteration, lr=lr_scheduler.get_last_lr()[0],
                       images_per_s=len(rollout.prompts) * world / (t1 - t0), time_sample=t1 - t0, time_score=t2 - t1,
                       time_update=t3 - t2)
            bad_streak = bad_streak + 1 if row.get("optimizer_steps", 0) == 0 else 0
            alarm = None  # the message of the stop alarms that fired at this iteration (training stats, evaluation)
            if accelerator.is_main_process:
                point, firings = monitor.observe_training(done, row)  # train_ alarms: every iteration, no evaluation
                row.update(point)
                pictures = {}
                if grid_prompts and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.num_iterations):
                    stats, pictures["samples"], _ = sample_grid(
                        sampler, reward_fn, grid_prompts, cfg, make_generator(cfg.seed, 0, GRID_NOISE),
                        out / "samples" / f"iter_{done:06d}.png", grid_base, f"Trained (iteration {done})",
                        metadata=held_out_metadata)
                    row.update(stats)
                if traj_prompts and (done % cfg.eval_every == 0 or done == cfg.num_iterations):
                    evaluated, on_evaluation, improved = monitor.observe(
                        done, trajectory_point(cfg, traj_prompts, sampler, eval_clip, reward_fn, judges,
                                               held_out_metadata))
                    append_jsonl(out / "eval_metrics.jsonl", {"iteration": done, **evaluated})
                    row.update({f"eval_{k}": v for k, v in evaluated.items()})
                    point, firings = {**point, **evaluated}, firings + on_evaluation
                    if improved:
                        export_best(done, monitor.best[1])
                    if accelerator.trackers:  # the trade-off plot so far (rendered only for a tracker)
                        from sd3_adrpo.plots import figure_array, load_trajectory, tradeoff_figure

                        pictures["tradeoff"] = figure_array(tradeoff_figure({cfg.method: load_trajectory(out)}))
                for firing in firings:
                    print(f"warning: {firing.message}" if firing.alarm.action == "warn" else firing.message)
                    row[f"alarm_{firing.alarm.signal}"] = firing.value
                stops = [f for f in firings if f.alarm.action == "stop"]
                alarm = "; ".join(f"{f.alarm.describe(point)} (iteration {done})" for f in stops) or None
                row["time_total"] = time.perf_counter() - t0
                append_jsonl(out / "metrics.jsonl", row)  # before the checkpoint: a checkpoint implies its rows
                # trackers: what was measured of the policy after `done` iterations (the periodic evaluation, its
                # alarms, the grids, named iter_<done>) at step `done`, as eval_metrics.jsonl and samples/ number
                # it, and the base's at 0; this iteration's rollout and update statistics at its own index
                after = {k: v for k, v in row.items() if k.startswith(("eval_", "alarm_"))}
                accelerator.log({k: v for k, v in row.items() if k not in after}, step=iteration)
                if after:
                    accelerator.log(after, step=done)
                log_images(accelerator, pictures, step=done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.num_iterations:
                    checkpoint(done)
            bar.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.2f}", w2=f"{row.get('w2', 0.0):.2e}")
            weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one device sync
            if bad_streak >= cfg.max_bad_iterations or not weights_ok:
                stage = failed_stage(sampled_ok, all_valid, row, weights_ok)
                # keep the last state that sampled finite images, never weights that broke: the current one when
                # this iteration sampled fine and took no step (e.g. the rewards failed), else the start of the last
                # iteration that sampled fine (or of the run)
                if sampled_ok and row.get("optimizer_steps", 0) == 0 and weights_ok:
                    good_iteration = done
                else:
                    good_iteration = restore(last_good, base_transformer, optimizer, lr_scheduler)["iteration"]
                    prompt_sampler.load_state_dict(last_good["trainer"]["prompt_sampler"])
                path = checkpoint(good_iteration) if accelerator.is_main_process else None
                kept = f"The last good state (the start of iteration {good_iteration}) is saved to {path}"
                if accelerator.is_main_process:  # later checkpoints hold what diverged: out of --resume_from latest
                    later = [c for c in list_checkpoints(out / "checkpoints") if c.name > path.name]
                    for c in later:
                        c.rename(c.with_name(f"diverged-{c.name}"))
                    kept += f" ({len(later)} later checkpoint(s) renamed diverged-*)" if later else ""
                raise NonFiniteError(
                    f"stopped after iteration {iteration} (last: {stage}). {kept}. Check the reward model, lower "
                    "learning_rate or beta0, or use bf16 instead of fp16, then continue with --resume_from latest "
                    "--allow_config_change true")
            # a stop alarm (the main process evaluates) stops every process after this iteration, with a checkpoint
            stop_alarm = any_process(alarm is not None)
            if stop_alarm and done == cfg.num_iterations:  # at the last evaluation: final/ is written, then exit 3
                final_alarm = alarm or "an alarm fired (see the main process)"
            elif stop_alarm:
                path = checkpoint(done) if accelerator.is_main_process else None
                if accelerator.is_main_process:
                    _plot_monitor(out, monitor, judges)
                accelerator.wait_for_everyone()
                if monitor.best:
                    kept = f"; best/ holds the best policy by {cfg.keep_best} (iteration {monitor.best[0]})"
                elif cfg.keep_best and accelerator.is_main_process:  # e.g. a train_ stop; only this process evaluates
                    kept = f"; no best/: no evaluation after the base has reported {cfg.keep_best} yet"
                else:
                    kept = ""
                raise AlarmStop(f"{alarm or 'an alarm fired (see the main process)'}. Checkpoint saved to "
                                f"{path or out / 'checkpoints'}{kept}; the signals are in eval_metrics.jsonl and "
                                f"monitor.png. Continue with --resume_from latest (alarms can change on resume)")
            # a signal that reached any process stops them all after this iteration, with one checkpoint
            signum = int(accelerator.reduce(torch.tensor(stop.signum or 0, device=device), "max")) if world > 1 else (
                stop.signum or 0)
            if signum and done < cfg.num_iterations:
                path = checkpoint(done) if accelerator.is_main_process else None
                accelerator.wait_for_everyone()
                raise TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name} after iteration "
                                          f"{iteration}; checkpoint saved to {path or out / 'checkpoints'}. Continue "
                                          "with --resume_from latest")

    final = out / "final"
    # a signal from here on lets the final LoRA and evaluation finish (a second one skips what is left, saying so)
    with StopOnSignal(at_once=f"after writing {final} but without the final evaluation (summary.json); evaluate "
                              "the LoRA with eval/table1.py") as stop:
        if accelerator.is_main_process:
            tmp = out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            export_policy(base_transformer, run_cfg, tmp)
            write_model_card(tmp, run_cfg, lora=str(final))
            replace_folder(tmp, final)
            print(f"done: LoRA saved to {final} (with its model card, README.md)")
        if final_prompts:
            final_evaluation(cfg, final_prompts, sampler, base_transformer, eval_clip, judges, out, accelerator,
                             held_out_metadata)
        if accelerator.is_main_process:
            if traj_prompts or monitor.training_alarms:
                _plot_monitor(out, monitor, judges)
            if final_alarm is None:  # a policy a stop alarm fired on is not uploaded
                publish(final, run_cfg, out)
        accelerator.end_training()
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, f"{signal.Signals(stop.signum).name} arrived during the final phase, "
                                  f"which finished: {final} and the summary are written")
    if final_alarm is not None:
        raise AlarmStop(f"{final_alarm}, at the last evaluation: {final} and the summary are written (not uploaded); "
                        "the signals are in eval_metrics.jsonl and monitor.png")
    return final
