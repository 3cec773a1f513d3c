"""One typed config for a training run: YAML file + ``--key value`` overrides, validated before any model loads.

Every field's ``help`` is what ``python train_sd3_adrpo.py --help`` prints. ``validate()`` checks everything that
can be checked without loading a model (files, folders, batch arithmetic, ranges), so a typo costs seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from sd3_adrpo.reward_spec import parse_reward


class ConfigError(ValueError):
    """Bad configuration; the message says what to change."""


def _f(default: Any, help: str, choices: Optional[tuple] = None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------------------------
    pretrained_model: str = _f("stabilityai/stable-diffusion-3-medium-diffusers",
                               "SD3 pipeline: a hub id or a local diffusers folder with the same layout")
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) of pretrained_model")
    drop_t5: bool = _f(False, "do not load the T5 encoder (text_encoder_3); the T5 context is then zeros of "
                              "length max_sequence_length, so keep that short")
    max_sequence_length: Optional[int] = _f(None, "T5 tokens in the text context; default 256 with T5, 16 without")
    mixed_precision: str = _f("no", "dtype of the frozen weights and of autocast: no (fp32), bf16 or fp16; "
                                    "the LoRA weights and the optimizer stay fp32", ("no", "bf16", "fp16"))
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha (scale = alpha / r); default: equal to lora_rank")
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"],
                            "transformer modules that get LoRA (peft target_modules); add add_q_proj, add_k_proj, "
                            "add_v_proj, to_add_out for the text stream")
    gradient_checkpointing: bool = _f(False, "recompute transformer activations in backward to save memory")
    optimizer: str = _f("adamw", "adamw (torch) or adamw8bit (bitsandbytes: 8-bit optimizer states)",
                        ("adamw", "adamw8bit"))
    free_text_encoders: bool = _f(False, "encode every prompt once at start-up, then free the text encoders")
    t5_8bit: bool = _f(False, "load the T5 encoder in 8 bit (bitsandbytes; needs a CUDA GPU)")
    # --- prompts ---------------------------------------------------------------------------------------------
    train_prompts: str = _f("prompts/example_train.txt", "prompt file the RL loop samples from (.txt, .csv, .jsonl)")
    eval_prompts: Optional[str] = _f("prompts/example_heldout.txt",
                                     "held-out prompts for the periodic sample grid; null to skip grids")
    # --- reward ----------------------------------------------------------------------------------------------
    reward: typing.Union[str, dict] = _f(
        "clip", "what the images are scored by (docs/rewards.md): a scorer name (clip, open_clip, clip_score, "
                "pickscore, aesthetic, hpsv2, image_reward, blip_score), optionally @WEIGHTS; a weighted sum "
                "NAME=W,NAME@WEIGHTS=W (YAML: a mapping name: weight or name: {weight, model, <options>}); a plug-in "
                "path/to/file.py:Class or package.module:Class; or a reward server's URL http://127.0.0.1:PORT")
    reward_model: str = _f("openai/clip-vit-large-patch14",
                           "weights of the clip / open_clip reward entry that names none: hub id or local folder "
                           "(clip); model name (open_clip)")
    reward_pretrained: Optional[str] = _f(None, "open_clip only: pretrained tag (e.g. openai) or local weights file")
    # --- the loop --------------------------------------------------------------------------------------------
    num_iterations: int = _f(100, "online iterations (sample -> score -> advantages -> update)")
    prompts_per_iteration: int = _f(8, "N distinct prompts sampled per iteration (per process, unless split_batches)")
    split_batches: bool = _f(False, "prompts_per_iteration and train_batch_size are global and split evenly over the "
                                    "processes, so any process count gives the same update; false: they are per process")
    samples_per_prompt: int = _f(4, "K images per prompt: a group for the advantage baseline (>= 2)")
    resolution: int = _f(512, "image height and width in pixels")
    num_inference_steps: int = _f(10, "Euler ODE steps of each rollout")
    guidance_scale: float = _f(4.5, "classifier-free guidance scale of rollouts (<= 1 disables CFG)")
    loss_guidance: str = _f("conditional", "the velocity field the loss and its W2 term compare: conditional (v_c "
                                           "alone) or guided (v_u + guidance_scale (v_c - v_u), the field rollouts "
                                           "sample, for the policy and the reference; two transformer passes per "
                                           "sample). The same without CFG (guidance_scale <= 1)",
                            ("conditional", "guided"))
    rollout_batch_size: int = _f(16, "images generated per transformer call (memory knob, no effect on results)")
    vae_batch_size: int = _f(8, "images decoded per VAE call (memory knob)")
    # --- method ----------------------------------------------------------------------------------------------
    method: str = _f("adrpo", "adrpo; or a baseline in the same loop: fixed_beta (ADRPO's loss, coefficient held at "
                              "beta0), orw_cfm_w2, raft, dpo", ("adrpo", "fixed_beta", "orw_cfm_w2", "raft", "dpo"))
    orw_tau: float = _f(0.5, "orw_cfm_w2: reward temperature of the weights exp(tau * r)")
    orw_alpha: float = _f(1.0, "orw_cfm_w2: fixed W2 coefficient")
    raft_fraction: float = _f(0.25, "raft: fraction of each prompt group kept (top by reward)")
    dpo_beta: float = _f(2000.0, "dpo: beta of -log sigmoid(-beta/2 [(e_w - e_w_ref) - (e_l - e_l_ref)])")
    # --- ADRPO -----------------------------------------------------------------------------------------------
    beta0: float = _f(1.0, "baseline divergence strength: loss = A*CFM + (beta0 - A)*W2")
    adv_scale: str = _f("none", "advantage scaling after the group-mean baseline",
                        ("none", "group_std", "batch_std"))
    adv_clip: bool = _f(True, "clip advantages to [adv_clip_min, adv_clip_max]")
    adv_clip_min: Optional[float] = _f(None, "lower advantage clip; default -beta0")
    adv_clip_max: Optional[float] = _f(None, "upper advantage clip; default +beta0")
    timestep_density: str = _f("uniform", "density of sigma for the loss (diffusers' SD3 samplers)",
                               ("uniform", "logit_normal", "mode"))
    logit_mean: float = _f(0.0, "logit_normal: mean")
    logit_std: float = _f(1.0, "logit_normal: std")
    mode_scale: float = _f(1.29, "mode: scale")
    timestep_shift: float = _f(1.0, "shift applied to the drawn sigma: s*u / (1 + (s-1)*u); 1 = none")
    # --- optimisation ----------------------------------------------------------------------------------------
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    lr_scheduler: str = _f("constant", "learning-rate schedule (diffusers.optimization names)",
                           ("constant", "constant_with_warmup", "linear", "cosine"))
    lr_warmup_steps: int = _f(0, "warm-up optimizer steps")
    train_batch_size: int = _f(4, "samples per forward/backward (per process, unless split_batches)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    inner_epochs: int = _f(1, "passes over each iteration's samples")
    seed: int = _f(0, "seed for LoRA init, prompt order, rollout noise and loss noise")
    # --- outputs ---------------------------------------------------------------------------------------------
    output_dir: str = _f("runs/adrpo", "run folder: metrics.jsonl, samples/, checkpoints/, final/")
    overwrite_output_dir: bool = _f(False, "delete an existing, non-empty output_dir first (never done silently)")
    resume_from: Optional[str] = _f(None, "continue a run: a checkpoint folder, or 'latest' (in output_dir; a run "
                                          "stopped before its first checkpoint starts over)")
    allow_config_change: bool = _f(False, "on resume, apply settings that differ from the run's own (learning "
                                          "rate, beta0, ...) from the resumed iteration on, recorded in "
                                          "config_history.jsonl; without it such a resume is refused")
    checkpoint_every: int = _f(50, "iterations between checkpoints (0: only at the end)")
    checkpoints_total_limit: int = _f(3, "keep only the newest k checkpoints")
    sample_every: int = _f(10, "iterations between held-out sample grids (0 disables)")
    num_sample_prompts: int = _f(4, "held-out prompts in each grid (rows)")
    sample_images_per_prompt: int = _f(4, "images per prompt in each grid (columns, fixed seeds)")
    eval_every: int = _f(0, "iterations between held-out evaluations of reward, ClipDiversity and W2 divergence "
                            "(eval_metrics.jsonl, the data of the trade-off plot); 0 disables")
    eval_num_prompts: int = _f(16, "prompts of eval_prompts in each periodic evaluation, balanced over the prompt "
                                   "categories a judge reports (else a seeded subset); 0: all")
    eval_images_per_prompt: int = _f(4, "images per prompt in each periodic evaluation (>= 2)")
    final_eval_prompts: Optional[str] = _f(None, "held-out prompts for the before/after evaluation at the end "
                                                 "(summary.json/.md in output_dir); null to skip")
    final_eval_num_prompts: int = _f(0, "evaluate a seeded random subset of this many prompts (0: all)")
    final_eval_images_per_prompt: int = _f(4, "images per prompt in the final evaluation (>= 2, for diversity)")
    final_eval_clip_model: Optional[str] = _f(None, "CLIP (hub id or folder) for ClipScore and ClipDiversity; "
                                                    "default: reward_model when reward is clip; also used by eval_every")
    judges: list = _f([], "scorers the policy is not trained on, reported beside ClipScore by eval_every and the final "
                          "evaluation (a column each, plus one per prompt category where a judge sorts prompts into "
                          "categories): a metric name or package.module:Class, optionally @WEIGHTS, e.g. "
                          "tinyworld.scorers:Oracle")
    alarms: list = _f([], "checked at every periodic evaluation (eval_every): 'SIGNAL < THRESHOLD [warn|stop]' or "
                          "'SIGNAL > THRESHOLD [...]', SIGNAL an eval_metrics.jsonl key, e.g. clip_diversity_rel_change "
                          "< -0.15 stop, or train_ and a metrics.jsonl key, checked every iteration (alarm_window), "
                          "e.g. train_reward_group_std_rel_change < -0.5; stop checkpoints, then exits 3 "
                          "(docs/monitor.md)")
    alarm_window: int = _f(3, "a train_ alarm's signal is the mean over this many iterations; its changes are from "
                              "the mean over the run's first this many")
    keep_best: Optional[str] = _f(None, "export the best policy so far by this periodic-evaluation signal as best/ "
                                        "(a diffusers LoRA beside final/), e.g. oracle_accuracy; a leading '-' means "
                                        "lower is better")
    report_to: str = _f("none", "experiment trackers (through accelerate) that get the metrics rows, the sample grids "
                                "and the trade-off plot: none, tensorboard (event files in logging_dir), wandb "
                                "(WANDB_MODE=offline works without network) or all; the JSONL files are always written",
                        ("none", "tensorboard", "wandb", "all"))
    wandb_project: str = _f("sd3-adrpo", "tracker project name (the wandb project; tensorboard's run folder name)")
    logging_dir: str = _f("logs", "tensorboard's folder, relative to output_dir")
    push_to_hub: bool = _f(False, "upload final/ (the LoRA and its model card) to the hub at the end "
                                  "(huggingface_hub; log in with `hf auth login` first)")
    hub_model_id: Optional[str] = _f(None, "hub repository for push_to_hub (org/name); default: output_dir's name "
                                           "under your account")
    cpu: bool = _f(False, "run on CPU even when a GPU is present")
    max_bad_iterations: int = _f(3, "stop (saving a checkpoint) after this many iterations in a row without a "
                                    "usable update: all rewards non-finite, or every step's loss/gradient non-finite")

    # ---------------------------------------------------------------------------------------------------------
    @property
    def samples_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt

    @property
    def clip_range(self) -> Optional[tuple[float, float]]:
        if not self.adv_clip:
            return None
        lo = -self.beta0 if self.adv_clip_min is None else self.adv_clip_min
        hi = self.beta0 if self.adv_clip_max is None else self.adv_clip_max
        return (lo, hi)

    @property
    def t5_length(self) -> int:
        if self.max_sequence_length is not None:
            return self.max_sequence_length
        return 16 if self.drop_t5 else 256

    @property
    def eval_clip_model(self) -> Optional[str]:
        if self.final_eval_clip_model is not None:
            return self.final_eval_clip_model
        return _clip_weights(self)

    @property
    def items_per_iteration(self) -> int:
        """What one update pass iterates over: samples, or for DPO (winner, loser) pairs, one per prompt."""
        return self.prompts_per_iteration if self.method == "dpo" else self.samples_per_iteration

    @property
    def items_per_batch(self) -> int:
        return self.train_batch_size // 2 if self.method == "dpo" else self.train_batch_size

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.inner_epochs * self.items_per_iteration // (self.items_per_batch * self.gradient_accumulation_steps)

    def per_process(self, num_processes: int) -> "TrainConfig":
        """This process's config: with ``split_batches``, prompts_per_iteration and train_batch_size divided by the
        number of processes (ConfigError if they do not divide evenly); otherwise unchanged."""
        if not self.split_batches or num_processes == 1:
            return self
        for name in ("prompts_per_iteration", "train_batch_size"):
            if getattr(self, name) % num_processes:
                raise ConfigError(f"split_batches: {name}={getattr(self, name)} does not divide over {num_processes} "
                                  f"processes; choose a multiple of {num_processes} or another process count")
        local = dataclasses.replace(self, prompts_per_iteration=self.prompts_per_iteration // num_processes,
                                    train_batch_size=self.train_batch_size // num_processes)
        try:
            local._check_batch_sizes()
        except ConfigError as e:
            raise ConfigError(f"split_batches over {num_processes} processes: {e}") from None
        return local

    def _check_family(self) -> None:
        """A local pipeline folder must be of a family this trainer trains (``sd3_adrpo.families``), with settings
        that apply to it (a hub id is checked when it loads)."""
        from sd3_adrpo.families import FAMILIES, FluxFamily, SanaFamily, pipeline_class_name, unsupported_message

        if not looks_like_path(self.pretrained_model):
            return
        name = pipeline_class_name(self.pretrained_model)
        if name not in FAMILIES:
            raise ConfigError(unsupported_message(name or "pipeline without a _class_name",
                                                  f"pretrained_model {self.pretrained_model!r}"))
        if FAMILIES[name] is FluxFamily and self.drop_t5:
            raise ConfigError("drop_t5 does not apply to FLUX: its text sequence is T5's (text_encoder_2). Pass "
                              "--no-drop_t5 (or remove it from the config); save memory with free_text_encoders "
                              "(prompts encoded once, then the encoders freed) or t5_8bit")
        if FAMILIES[name] is SanaFamily and (self.drop_t5 or self.t5_8bit):
            raise ConfigError("drop_t5 and t5_8bit do not apply to SANA: it has no T5 (its text encoder is Gemma-2). "
                              "Pass --no-drop_t5 / --no-t5_8bit (or remove them from the config); save memory with "
                              "free_text_encoders (prompts encoded once, then the encoder freed)")

    def _check_batch_sizes(self) -> None:
        if self.method == "dpo" and self.train_batch_size % 2:
            raise ConfigError(f"dpo trains on (winner, loser) pairs: train_batch_size must be even, got {self.train_batch_size}")
        micro = self.items_per_batch * self.gradient_accumulation_steps
        if self.method == "dpo" and self.prompts_per_iteration % micro:
            raise ConfigError(
                f"dpo: {self.prompts_per_iteration} pairs per iteration (one per prompt) do not divide into "
                f"train_batch_size / 2 * gradient_accumulation_steps = {micro}")
        if self.samples_per_iteration % (self.train_batch_size * self.gradient_accumulation_steps):
            raise ConfigError(
                f"prompts_per_iteration * samples_per_prompt = {self.samples_per_iteration} samples per iteration "
                f"do not divide into train_batch_size * gradient_accumulation_steps = "
                f"{self.train_batch_size * self.gradient_accumulation_steps}: choose sizes so "
                "that every optimizer step sees the same number of samples")

    def validate(self) -> "TrainConfig":
        """Check everything checkable without loading a model. Raises ConfigError saying what to do."""
        for name in ("num_iterations", "prompts_per_iteration", "resolution", "num_inference_steps",
                     "rollout_batch_size", "vae_batch_size", "train_batch_size", "gradient_accumulation_steps", "inner_epochs",
                     "lora_rank", "num_sample_prompts", "sample_images_per_prompt", "checkpoints_total_limit",
                     "max_bad_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "sample_every", "lr_warmup_steps", "max_grad_norm", "learning_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 (got {self.samples_per_prompt}): advantages are "
                              "rewards minus their prompt group's mean, so a group of one always has A = 0")
        if not self.beta0 > 0:
            raise ConfigError(f"beta0 must be > 0 (got {self.beta0}): it is the baseline divergence strength")
        if self.clip_range is not None and not self.clip_range[0] < self.clip_range[1]:
            raise ConfigError(f"advantage clip range {self.clip_range} is empty: need adv_clip_min < adv_clip_max")
        if self.resolution % 16:
            raise ConfigError(f"resolution must be a multiple of 16 (VAE x8 times patch 2), got {self.resolution}")
        if not 0 < self.raft_fraction <= 1:
            raise ConfigError(f"raft_fraction is a fraction of each group: need 0 < raft_fraction <= 1, got {self.raft_fraction}")
        self._check_batch_sizes()
        if self.t5_8bit:
            import torch

            if self.drop_t5:
                raise ConfigError("t5_8bit and drop_t5 contradict each other: pick one")
            if self.cpu or not torch.cuda.is_available():
                raise ConfigError("t5_8bit needs a CUDA GPU (bitsandbytes 8-bit weights); use drop_t5 on CPU")
        if self.timestep_shift <= 0:
            raise ConfigError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        _check_model_source(self.pretrained_model, "pretrained_model", need="model_index.json")
        self._check_family()
        try:
            terms = parse_reward(self.reward, self.reward_model, self.reward_pretrained)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for term in terms:
            if term.spec == "clip" and term.model is not None:
                _check_model_source(term.model, term.model_from or "reward clip@", need="config.json")
        if self.eval_every:
            if self.eval_prompts is None:
                raise ConfigError("eval_every needs eval_prompts (held-out prompts to evaluate on)")
            if self.eval_images_per_prompt < 2 or self.eval_num_prompts < 0:
                raise ConfigError("eval_images_per_prompt must be >= 2 and eval_num_prompts >= 0 (0: all)")
            if self.eval_clip_model is None:
                raise ConfigError("eval_every needs a CLIP for ClipDiversity: set final_eval_clip_model")
        from sd3_adrpo.monitor import TRAINING, parse_alarm  # numpy only

        parsed = []
        for spec in self.alarms:
            try:
                parsed.append(parse_alarm(spec))
            except ValueError as e:
                raise ConfigError(f"alarms: {e}") from None
        on_evaluation = [str(a) for a in parsed if not a.signal.startswith(TRAINING)]
        if (on_evaluation or self.keep_best) and not self.eval_every:
            what = ([f"keep_best {self.keep_best}"] if self.keep_best else []) + [f"alarm {a!r}" for a in on_evaluation]
            raise ConfigError(f"{'; '.join(what)}: the periodic evaluation is what they watch: set eval_every (e.g. "
                              "10); only train_ alarms watch training statistics and need none")
        if self.alarm_window < 1:
            raise ConfigError(f"alarm_window must be >= 1 iteration, got {self.alarm_window}")
        if self.final_eval_prompts is not None:
            if self.final_eval_images_per_prompt < 2:
                raise ConfigError("final_eval_images_per_prompt must be >= 2: ClipDiversity compares images of a prompt")
            if self.final_eval_num_prompts < 0:
                raise ConfigError(f"final_eval_num_prompts must be >= 0, got {self.final_eval_num_prompts}")
            if self.eval_clip_model is None:
                raise ConfigError("the final evaluation needs a CLIP: set final_eval_clip_model (reward is not clip)")
            _check_model_source(self.eval_clip_model, "final_eval_clip_model", need="config.json")
        for name in ("train_prompts", "eval_prompts", "final_eval_prompts"):
            _check_prompt_file(getattr(self, name), name)
        if self.resume_from not in (None, "latest") and not Path(self.resume_from).is_dir():
            raise ConfigError(f"resume_from: no such checkpoint folder {self.resume_from!r}")
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir {str(out)!r} is a file, not a folder: choose another output_dir (a run "
                              "folder holds the LoRA, logs and checkpoints)")
        # (.lock: the run lock, which another process of this run may have just taken)
        if (out.exists() and any(p.name != ".lock" for p in out.iterdir()) and self.resume_from is None
                and not self.overwrite_output_dir):
            raise ConfigError(f"output_dir {str(out)!r} exists and is not empty. Choose another output_dir, continue "
                              "it with --resume_from latest, or pass --overwrite_output_dir true to delete it")
        if self.resume_from and self.overwrite_output_dir:
            raise ConfigError("resume_from and overwrite_output_dir contradict each other: pick one")
        if self.push_to_hub and _offline():
            raise ConfigError("push_to_hub needs the hub, but HF_HUB_OFFLINE is set: unset it, or train without "
                              "push_to_hub and upload final/ later (`hf upload <repo> <output_dir>/final`)")
        # last, as they import torch (a few seconds): everything above answers in about a second
        from sd3_adrpo.rewards import check_reward  # no model is loaded; a plug-in's file is imported

        try:
            check_reward(self.reward, self.reward_model, self.reward_pretrained)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.judges:
            from sd3_adrpo.metrics import metric_class  # imports the judge's module, loads no model
            from sd3_adrpo.reward_spec import judge_term

            for spec in self.judges:
                try:
                    metric_class(judge_term(spec).spec)
                except ValueError as e:
                    raise ConfigError(f"judges: {e}") from None
        return self


def _clip_weights(cfg: TrainConfig) -> Optional[str]:
    """The weights of the reward's ``clip`` entry (the evaluation's default CLIP), if it has one."""
    try:
        clip = [t for t in parse_reward(cfg.reward, cfg.reward_model, cfg.reward_pretrained) if t.spec == "clip"]
    except ValueError:
        return None  # validate() says what is wrong with reward
    return clip[0].model if clip else None


def looks_like_path(name: str) -> bool:
    """A hub id is 'org/name' (or 'name'); anything absolute, relative-dotted, ~ or deeper is a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or os.path.exists(name))


def _check_prompt_file(path: Optional[str], key: str) -> None:
    """A local prompt file exists and holds prompts (hub files, hf://..., are fetched and checked at start-up)."""
    if path is None or str(path).startswith("hf://"):
        return
    if not Path(path).is_file():
        raise ConfigError(f"{key}: no such file {path!r} (relative paths are from {os.getcwd()})")
    from sd3_adrpo.prompts import load_prompts  # numpy only

    try:
        load_prompts(path)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _check_model_source(name: str, key: str, need: str) -> None:
    if not looks_like_path(name):
        return  # a hub id: resolved when the model loads (the trainer turns a failure into a ConfigError)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}: no such model folder {name!r}. Pass a hub id (org/name) or an existing local "
                          "folder; for the tiny default run `python -m tinyworld.stand_ins` first")
    if not (path / need).is_file():
        raise ConfigError(f"{key}: {name!r} has no {need}; it is not a diffusers/transformers model folder")


# --------------------------------------------------------------------------------------------------------------
# Parsing: YAML file, then command-line overrides. Both reject unknown keys with a suggestion.

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


# diffusers' names (examples/dreambooth/train_dreambooth_lora_sd3.py) where a key means the same thing; keys whose
# name already matches (output_dir, seed, resolution, learning_rate, report_to, ...) need none. docs/cli.md lists them.
ALIASES = {"pretrained_model_name_or_path": "pretrained_model", "resume_from_checkpoint": "resume_from",
           "rank": "lora_rank", "lora_layers": "lora_targets", "tracker_project_name": "wandb_project"}
# diffusers' flags that set one of our keys to a value
FLAG_ALIASES = {"use_8bit_adam": ("optimizer", "adamw8bit")}


def _unknown_key(key: str, where: str) -> ConfigError:
    names = [*_FIELDS, *ALIASES, *FLAG_ALIASES]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        name = close[0]
        hint = f" Did you mean {name!r}?" if name in _FIELDS else (
            f" Did you mean {name!r} (diffusers' name for {(ALIASES.get(name) or FLAG_ALIASES[name][0])!r})?")
    else:
        hint = " See --help for the keys."
    return ConfigError(f"unknown config key {key!r} in {where}.{hint}")


def _canonical(values: dict, where: str) -> dict:
    """YAML keys with diffusers' names under ours; a key given under both names is an error."""
    out = {}
    for key, value in values.items():
        if key in FLAG_ALIASES:
            name, flag_value = FLAG_ALIASES[key]
            if not _as_bool(key, value):  # a flag: false sets nothing
                continue
            key, value = name, flag_value
        key = ALIASES.get(key, key)
        if key in out:
            raise ConfigError(f"{where} sets {key!r} twice (once under a diffusers alias): keep one")
        out[key] = value
    return out


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    tp = _TYPES[key]
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and tp is not str):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    try:
        if tp is bool:
            return _as_bool(key, value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return list(value)
        if tp is str:
            if isinstance(value, bool) and value is False and "no" in (_FIELDS[key].metadata.get("choices") or ()):
                value = "no"  # YAML 1.1 reads a bare `no` as false
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    choices = _FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def load_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config; a ``base_config: other.yaml`` key (relative to this file) is read first and overridden."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: base_config cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:  # a syntax error, or a tag (!!python/...) that safe_load refuses
        raise ConfigError(f"{path} is not a plain YAML mapping of key: value ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]}); fix the line it names") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    base = data.pop("base_config", None)
    if base is not None:
        data = {**load_yaml(path.parent / base, (*_seen, path.resolve())), **data}
    return data


def make_config(values: dict, where: str = "config") -> TrainConfig:
    values = _canonical(values, where)
    for key in values:
        if key not in _FIELDS:
            raise _unknown_key(key, where)
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def _sections() -> dict[str, list[str]]:
    """TrainConfig's keys under the section headings its source marks (``# --- model ---``), in source order."""
    import inspect
    import re

    sections, current = {}, "other"
    for line in inspect.getsource(TrainConfig).splitlines():
        heading = re.match(r"\s*# --- (\w[\w ]*?) -+\s*$", line)
        if heading:
            current = heading.group(1)
            continue
        key = re.match(r"    (\w+):", line)
        if key and key.group(1) in _FIELDS:
            sections.setdefault(current, []).append(key.group(1))
    placed = {k for keys in sections.values() for k in keys}
    sections.setdefault("other", []).extend(k for k in _FIELDS if k not in placed)
    return {name: keys for name, keys in sections.items() if keys}


def _kind(key: str) -> str:
    """The type shown in --help: INT, FLOAT, STR, BOOL, LIST (comma-separated)."""
    tp = _TYPES[key]
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return {list: "A,B,..."}.get(tp, getattr(tp, "__name__", str(tp)).upper())


class _BoolFlag(argparse.Action):
    """``--x`` alone sets true, ``--no-x`` false, and ``--x true|false`` (what scripts write) still works."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__([*option_strings, *negated], dest, nargs="?", **kwargs)
        self.negated = set(negated)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.negated:
            if values is not None:
                raise ConfigError(f"{option_string} takes no value (it sets {self.dest} to false)")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class _FlagValue(argparse.Action):
    """A diffusers flag that stands for ``--key value`` (``--use_8bit_adam``: ``--optimizer adamw8bit``)."""

    def __init__(self, option_strings, dest, value=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.value = value

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.value)


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(120, max(80, shutil.get_terminal_size().columns)))

    def _format_action_invocation(self, action):
        if isinstance(action, _BoolFlag):  # --x [BOOL], --no-x
            positive = [o for o in action.option_strings if o not in action.negated]
            return ", ".join([f"{o} [BOOL]" for o in positive] + sorted(action.negated))
        return super()._format_action_invocation(action)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def build_parser(defaults: Optional[dict] = None, source: Optional[str] = None) -> argparse.ArgumentParser:
    """The training CLI: every TrainConfig key as ``--key``, grouped by section, with diffusers' names as aliases and
    booleans as flags. ``defaults`` (a config file's values, from ``source``) are the defaults --help shows."""
    defaults = _canonical(defaults or {}, source or "config")
    parser = argparse.ArgumentParser(
        description="Online RL fine-tuning of SD3 with ADRPO: sample -> score -> advantages -> LoRA update.",
        epilog="Every key can be set in the YAML file given by --config and overridden as --key value (booleans: "
               "--key, --no-key or --key true|false). diffusers' names work too (--pretrained_model_name_or_path, "
               "--resume_from_checkpoint, --rank, --lora_layers, --use_8bit_adam, --tracker_project_name); "
               "docs/cli.md lists them.",
        usage="%(prog)s [--config YAML] [--key VALUE ...] [--flag | --no-flag ...]", formatter_class=_HelpFormatter,
        allow_abbrev=False)
    parser.add_argument("--config", metavar="YAML", help="YAML file of key: value pairs (keys below); --help then "
                                                         "shows its values as the defaults")
    aliases = {key: [f"--{a}" for a, k in ALIASES.items() if k == key] for key in _FIELDS}
    for section, keys in _sections().items():
        group = parser.add_argument_group(section)
        for name in keys:
            f, tp = _FIELDS[name], _TYPES[name]
            choices = f.metadata.get("choices")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = (f"{_show(defaults[name])}, from {source}" if name in defaults and source else _show(default))
            text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
            options = [f"--{name}", *aliases[name]]
            if tp is bool:
                group.add_argument(*options, action=_BoolFlag, default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(*options, default=argparse.SUPPRESS, choices=choices, help=text,
                                   metavar=None if choices else _kind(name))
            for flag, (key, value) in FLAG_ALIASES.items():
                if key == name:
                    group.add_argument(f"--{flag}", dest=name, action=_FlagValue, value=value,
                                       default=argparse.SUPPRESS, help=f"diffusers' name for --{name} {value}")
    return parser


def _config_path(argv: list[str]) -> Optional[str]:
    """The value of --config in ``argv`` (before the full parse, so --help can show the file's values)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """YAML (--config) first, then each --key value on top; unknown keys fail with a suggestion."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    values = load_yaml(path) if path else {}
    where = path or "config"
    parser = build_parser(values, path)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        key = unknown[0].lstrip("-").split("=")[0]
        raise _unknown_key(key, "the command line") if unknown[0].startswith("--") else ConfigError(
            f"unexpected argument {unknown[0]!r}: options are --key value")
    values = _canonical(values, where)
    if set(values) - set(_FIELDS):
        raise _unknown_key(sorted(set(values) - set(_FIELDS))[0], where)
    overrides = {k: (yaml.safe_load(v) if isinstance(v, str) and _TYPES[k] is not str else v)
                 for k, v in vars(args).items() if k != "config"}
    return make_config({**values, **overrides}, where)
