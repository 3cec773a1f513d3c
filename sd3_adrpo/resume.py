"""What a run folder must guarantee across restarts: one run at a time in it, a resume that continues the run it
says it continues (a changed setting is refused, or applied and recorded when the user asks), and a requeued job
that was killed before its first checkpoint starting over instead of being stranded."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from sd3_adrpo.config import ConfigError, TrainConfig
from sd3_adrpo.io import append_jsonl

LOCK = ".lock"
# Settings a resumed run may change without becoming another run: where and how often it writes, how long it goes
# on, memory knobs with no effect on results, and how it is evaluated or tracked.
FREE_ON_RESUME = {"output_dir", "overwrite_output_dir", "resume_from", "allow_config_change", "num_iterations",
                  "checkpoint_every", "checkpoints_total_limit", "sample_every", "num_sample_prompts",
                  "sample_images_per_prompt", "eval_every", "eval_num_prompts", "eval_images_per_prompt",
                  "final_eval_prompts", "final_eval_num_prompts", "final_eval_images_per_prompt",
                  "final_eval_clip_model", "judges", "report_to", "wandb_project", "logging_dir", "push_to_hub",
                  "hub_model_id", "cpu", "max_bad_iterations", "alarms", "keep_best",
                  "rollout_batch_size", "vae_batch_size"}
# The LoRA's shape is in the checkpoint's tensors: it cannot change, even when asked.
FIXED = {"lora_rank", "lora_alpha", "lora_targets"}
# What a start writes before its first checkpoint: a run holding only these can start over.
START_FILES = {"config.yaml", "metrics.jsonl", "eval_metrics.jsonl", "samples", "checkpoints", LOCK,
               "config_history.jsonl", "logs"}


class RunLock:
    """An exclusive lock on ``<output_dir>/.lock`` for the life of a run. The operating system releases it when the
    process ends, however it ends, so a dead run never holds it; a second run or resume into a locked folder fails
    with a ConfigError naming the holder."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path, self.fd = Path(output_dir) / LOCK, None

    @staticmethod
    def holder(output_dir: str | os.PathLike) -> Optional[str]:
        """Who holds the folder's lock ('pid P on HOST since T'), or None if nobody does."""
        import fcntl

        path = Path(output_dir) / LOCK
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            try:
                info = json.loads(path.read_text())
                return f"pid {info['pid']} on {info['host']} since {info['since']}"
            except (ValueError, KeyError):
                return "another process"
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise _in_use(self.path.parent, RunLock.holder(self.path.parent)) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing the descriptor releases the lock


def check_not_in_use(output_dir: str | os.PathLike) -> None:
    """ConfigError if a live run holds ``output_dir`` (before anything there is deleted or written)."""
    holder = RunLock.holder(output_dir) if Path(output_dir).is_dir() else None
    if holder:
        raise _in_use(output_dir, holder)


def _in_use(output_dir, holder: Optional[str]) -> ConfigError:
    return ConfigError(f"output_dir {str(output_dir)!r} is in use by {holder or 'another process'}: wait for that run "
                       "to end (or stop it), or choose another output_dir")


def can_start_over(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds only what a start writes before its first checkpoint (its config, logs, grids,
    and at most an unfinished checkpoint), so a ``--resume_from latest`` with nothing to resume may start over."""
    out = Path(output_dir)
    if not out.exists():  # a requeue script that always passes --resume_from latest, on its first start
        return True
    if not out.is_dir() or any(p.name not in START_FILES for p in out.iterdir()):
        return False
    ckpts = out / "checkpoints"
    return not ckpts.is_dir() or all(p.name.startswith(".tmp-") for p in ckpts.iterdir())


@dataclasses.dataclass
class RunStart:
    """How a run starts in its folder: from ``checkpoint`` (None: from scratch), with the setting ``changes`` a
    resume applies; ``start_over``: a resume that found nothing to resume and starts from scratch."""

    checkpoint: Optional[Path]
    changes: dict
    start_over: bool = False


def open_run(cfg: TrainConfig, is_main: bool) -> RunStart:
    """Everything about the run folder that can fail, checked before any model loads: the checkpoint a resume
    continues (or starting over when a requeued job finds none yet), its settings against the run's own, and that
    no live run holds the folder. (With ``overwrite_output_dir`` the old contents are deleted only once the models have
    loaded: ``clear_run_folder``.)"""
    from sd3_adrpo.checkpoint import find_resume_checkpoint

    out = Path(cfg.output_dir)
    start = RunStart(None, {})
    if cfg.resume_from:
        try:
            start.checkpoint = find_resume_checkpoint(cfg.resume_from, out)
        except ValueError as e:
            if not (cfg.resume_from == "latest" and can_start_over(out)):
                raise ConfigError(f"{e}. Pass --resume_from a checkpoint folder, or start a new run (another "
                                  "output_dir, or --overwrite_output_dir true to delete this one)") from None
            print(f"resume_from latest: {out} has no checkpoint yet (the run stopped before its first one), so the "
                  "run starts over there")
            start.start_over = True
    if is_main:  # the other processes of this run find the main process's lock, which is theirs
        check_not_in_use(out)
    saved = out / "config.yaml"
    if start.checkpoint is not None and saved.is_file():
        import yaml

        start.changes = check_resume_config(yaml.safe_load(saved.read_text()) or {}, cfg)
    return start


def clear_run_folder(out: Path) -> None:
    """Delete what an earlier run left in ``out`` (``overwrite_output_dir``), all but this run's lock. Called once the
    models have loaded, so that a start that fails (a hub id that does not resolve, a reward that does not load)
    leaves the earlier run as it was."""
    import shutil

    old = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if old:
        print(f"overwrite_output_dir is set: deleting the existing contents of {out}")
    for p in old:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def config_changes(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """{setting: (saved value, new value)} for each setting that would make a resumed run another run."""
    new = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(TrainConfig())  # a setting added since the run started counts as its default
    return {k: (saved.get(k, defaults.get(k)), v) for k, v in new.items()
            if k not in FREE_ON_RESUME and saved.get(k, defaults.get(k)) != v}


def check_resume_config(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """The changes a resume applies; ConfigError if there are any and ``allow_config_change`` is off, or if the
    LoRA's shape changed."""
    changes = config_changes(saved, cfg)
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if FIXED & changes.keys():
        raise ConfigError(f"the checkpoint's LoRA cannot change shape on resume ({listed}); start a new run in "
                          "another output_dir")
    if changes and not cfg.allow_config_change:
        raise ConfigError(f"--resume_from continues the run in {cfg.output_dir!r}, but these settings differ from "
                          f"the ones it was started with: {listed}. Resume with the run's own settings, or pass "
                          "--allow_config_change true to apply the changes from here on (recorded in "
                          "config_history.jsonl)")
    return changes


def apply_optimizer_settings(optimizer, lr_scheduler, cfg: TrainConfig) -> None:
    """Make a resumed optimizer and scheduler use ``cfg``'s learning rate and AdamW settings (a checkpoint restores
    the old ones): the base rate of the schedule and the current rate alike."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    for group, lmbda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(lr=cfg.learning_rate * lmbda(scheduler.last_epoch), initial_lr=cfg.learning_rate,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def record_changes(output_dir: str | os.PathLike, iteration: int, changes: dict[str, tuple]) -> None:
    """Append the settings a resume changed to ``config_history.jsonl`` (config.yaml then holds the new ones)."""
    append_jsonl(Path(output_dir) / "config_history.jsonl",
                 {"iteration": iteration, "changed": {k: {"from": old, "to": new} for k, (old, new) in changes.items()},
                  "at": time.strftime("%Y-%m-%d %H:%M:%S")})
