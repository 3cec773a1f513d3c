"""Run guards: stop cleanly on SIGINT/SIGTERM, give up loudly on repeated non-finite updates, check that
processes agree on the weights."""

from __future__ import annotations

import os
import signal
from typing import Mapping, Optional

import torch


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` follows the shell's 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteError(FloatingPointError):
    """Too many iterations in a row produced no usable update; a checkpoint of the last good state was saved."""


class RewardUnavailable(NonFiniteError):
    """The reward could not be computed at all (its server is down, timed out or answered garbage): the run stopped
    with a checkpoint of the iteration's start rather than train on a made-up reward. Exit code 1, like
    ``NonFiniteError``."""


class AlarmStop(Exception):
    """A monitor alarm with action 'stop' fired (``sd3_adrpo.monitor``); a checkpoint was saved. Its message names the
    signal, its value and its threshold."""

    exit_code = 3  # sd3_adrpo.monitor.ALARM_EXIT_CODE


class StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request to stop at the next safe point; a second one stops at once, as
    a ``TrainingInterrupted`` whose exit code is 128 + that signal and whose message says what was not saved
    (``at_once``)."""

    def __init__(self, at_once: str = "without saving a checkpoint; continue from the last one with --resume_from "
                                      "latest"):
        self.signum: Optional[int] = None
        self.at_once = at_once
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise TrainingInterrupted(signum, f"stopped at once by a second {name}, {self.at_once}")
        self.signum = signum
        print(f"\nreceived {name}: finishing the current step, then stopping (send it again to stop at once, "
              f"{self.at_once})", flush=True)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is TrainingInterrupted:
            # stopping: a signal from here to the exit must not kill the process mid-way (with -SIG, no message);
            # the previous handlers come back through restore_signal_handlers()
            for sig in self._previous:
                signal.signal(sig, lambda signum, frame: print(f"already stopping ({signal.Signals(signum).name} "
                                                               "ignored)", flush=True))
            _stopping.update(self._previous)
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_stopping: dict = {}

# The environment variables by which `accelerate launch` asks for a sharded backend (from its config's
# distributed_type), and why each is not run: see docs/gpu.md.
SHARDED_LAUNCHES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (it steps inside backward, past the non-finite guard, and shards the "
                                "optimizer state that checkpoints save)",
    "ACCELERATE_USE_FSDP": "FSDP (rollouts, evaluation and the LoRA export read the unsharded module; accelerate "
                           "cannot run it on CPU, so it is untested)",
}


def refuse_sharded_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Stop before anything loads when launched with DeepSpeed or FSDP: DDP is the tested multi-GPU path."""
    from sd3_adrpo.config import ConfigError

    for var, what in SHARDED_LAUNCHES.items():
        if environ.get(var, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"this launch asks for {what}, which this trainer does not support; launch with DDP "
                              "instead: accelerate launch --config_file configs/accelerate/multi_gpu.yaml (or "
                              "torchrun). LoRA training replicates the weights comfortably: see docs/gpu.md")


def restore_signal_handlers() -> None:
    """After a stop, the handlers that were there before the run (for a caller that goes on, like a test)."""
    for sig, handler in _stopping.items():
        signal.signal(sig, handler)
    _stopping.clear()


def block_late_signals() -> None:
    """For a process that is exiting after a stop: ignore SIGINT/SIGTERM at the operating-system level. Python's own
    handlers are put back to the default while the interpreter shuts down, so a late signal then would kill the
    process (every thread) and replace its exit code; an ignore disposition is left as it is."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def check_in_sync(accelerator, params: list[torch.nn.Parameter]) -> None:
    """With several processes, the LoRA must be identical everywhere after each update (DDP's promise; checked)."""
    if accelerator.num_processes > 1:
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
        sums = accelerator.gather(checksum)
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"LoRA weights differ between processes after an update: {sums.tolist()}")
