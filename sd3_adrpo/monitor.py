"""Collapse and reward-hacking alarms: what the periodic held-out evaluation (``eval_every``) watches, and what it does
when a signal crosses its threshold.

Signals are the evaluation's own numbers (the reward, ClipScore, ClipDiversity, guided W2, each judge's score) plus
image statistics that reveal reward hacking without any model (``image_statistics``): an optimiser that wipes
backgrounds or paints grid artefacts moves colour entropy, brightness, saturation and edge density long before a person
looks. Every signal is also reported as a change from the first evaluation (the base policy, iteration 0):
``<signal>_change`` (difference) and ``<signal>_rel_change`` (relative difference).

An alarm is a string, ``SIGNAL OP THRESHOLD [ACTION]``, e.g.::

    clip_diversity_rel_change < -0.15 stop      # diversity fell by more than 15% of the base's
    w2_divergence > 0.05 warn                    # the sampled policy drifted this far from the reference
    oracle_accuracy_change < -0.02 stop          # a judge the policy is not trained on lost 2 points

A signal named ``train_<key>`` watches a training statistic of metrics.jsonl instead (``reward_group_std``, ``w2``,
``adv_frac_clipped``, ...), checked at every iteration with no evaluation at all: its value is the mean of ``key``
over the last ``window`` iterations, its changes are from the mean over the run's first ``window`` (the base policy's
rollouts, near enough), reported once the two windows no longer overlap::

    train_reward_group_std_rel_change < -0.5 stop   # a group's samples scored alike: the policy stopped exploring

OP is ``<`` or ``>``; ACTION is ``warn`` (console and trackers, the default) or ``stop`` (checkpoint, then exit with
``ALARM_EXIT_CODE`` and a message naming the signal, its value and its threshold). Keep-best (``keep_best: SIGNAL``)
exports the best policy so far by that signal as ``best/`` beside ``final/``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

TRAINING = "train_"  # the prefix of a signal on a training statistic (metrics.jsonl), not on the evaluation
ALARM_EXIT_CODE = 3  # train_sd3_adrpo.py's exit code when a stop alarm fired (config errors are 2, divergence 1)
ACTIONS = ("warn", "stop")
_SPEC = re.compile(r"^\s*(?P<signal>[A-Za-z_][\w.]*)\s*(?P<op>[<>])\s*(?P<threshold>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)"
                   r"\s*(?P<action>\w+)?\s*$")


# --------------------------------------------------------------------------------------------------------------
# Image statistics (numpy only: four formulas of a few lines each, where an image library would add a dependency
# for one call apiece)

def colour_entropy(images: np.ndarray, levels: int = 8) -> np.ndarray:
    """Shannon entropy (bits) of each image's colour histogram, each channel quantised to ``levels`` values
    (``levels**3`` bins): 0 for a single flat colour, up to 3*log2(levels) for uniform noise."""
    q = (images.astype(np.int64) * levels) // 256
    codes = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    out = np.empty(len(images))
    for i, c in enumerate(codes.reshape(len(images), -1)):
        p = np.bincount(c, minlength=levels ** 3) / c.size
        p = p[p > 0]
        out[i] = float(-(p * np.log2(p)).sum())
    return out


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean luma (ITU-R BT.601 weights) of each image, in [0, 1]."""
    x = images.astype(np.float64) / 255.0
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).mean(axis=(1, 2))


def saturation(images: np.ndarray) -> np.ndarray:
    """Mean HSV saturation (max - min) / max of each image, in [0, 1] (0 for grey pixels, black included)."""
    x = images.astype(np.float64) / 255.0
    hi, lo = x.max(-1), x.min(-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0).mean(axis=(1, 2))


def edge_density(images: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Fraction of each image's interior pixels whose Sobel gradient magnitude of luma (in [0, 1] units, divided by
    the kernel's 4) exceeds ``threshold``."""
    x = images.astype(np.float64) / 255.0
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    gx = (y[:, :-2, 2:] + 2 * y[:, 1:-1, 2:] + y[:, 2:, 2:]) - (y[:, :-2, :-2] + 2 * y[:, 1:-1, :-2] + y[:, 2:, :-2])
    gy = (y[:, 2:, :-2] + 2 * y[:, 2:, 1:-1] + y[:, 2:, 2:]) - (y[:, :-2, :-2] + 2 * y[:, :-2, 1:-1] + y[:, :-2, 2:])
    return (np.hypot(gx, gy) / 4.0 > threshold).mean(axis=(1, 2))


IMAGE_STATISTICS = {"colour_entropy": colour_entropy, "brightness": brightness, "saturation": saturation,
                    "edge_density": edge_density}


def image_statistics(images) -> dict[str, float]:
    """The mean of each image statistic over uint8 images (B, H, W, 3)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"image statistics take uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    return {name: float(fn(images).mean()) for name, fn in IMAGE_STATISTICS.items()}


def with_changes(point: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``point`` plus, for every signal the base (the first evaluation) also has, ``<signal>_change`` (difference)
    and ``<signal>_rel_change`` (difference over the base's magnitude; absent where the base is 0)."""
    out = dict(point)
    for key, value in point.items():
        if key in base and isinstance(value, (int, float)) and math.isfinite(base[key]) and key != "iteration":
            out[f"{key}_change"] = value - base[key]
            if base[key] != 0:
                out[f"{key}_rel_change"] = (value - base[key]) / abs(base[key])
    return out


# --------------------------------------------------------------------------------------------------------------
# Alarms

@dataclass(frozen=True)
class Alarm:
    signal: str
    op: str
    threshold: float
    action: str = "warn"

    def fired(self, point: dict) -> bool:
        value = point.get(self.signal)
        if value is None or not math.isfinite(value):
            return False
        return value < self.threshold if self.op == "<" else value > self.threshold

    def describe(self, point: dict) -> str:
        return f"{self.signal} = {point.get(self.signal):.4g} {self.op} {self.threshold:g}"

    def __str__(self) -> str:
        return f"{self.signal} {self.op} {self.threshold:g} {self.action}"


def parse_alarm(spec: str) -> Alarm:
    """``SIGNAL OP THRESHOLD [ACTION]`` -> Alarm; ValueError saying the form otherwise."""
    m = _SPEC.match(str(spec))
    if not m:
        raise ValueError(f"alarm {spec!r} is not 'SIGNAL < THRESHOLD [warn|stop]' or 'SIGNAL > THRESHOLD [...]', e.g. "
                         "'clip_diversity_rel_change < -0.15 stop'")
    action = m["action"] or "warn"
    if action not in ACTIONS:
        raise ValueError(f"alarm {spec!r}: action {action!r} is not one of {', '.join(ACTIONS)}")
    return Alarm(m["signal"], m["op"], float(m["threshold"]), action)


@dataclass
class Firing:
    alarm: Alarm
    iteration: int
    value: float

    @property
    def message(self) -> str:
        return (f"alarm at iteration {self.iteration}: {self.alarm.signal} = {self.value:.4g} crossed its threshold "
                f"({self.alarm.op} {self.alarm.threshold:g}); action: {self.alarm.action}")


def training_key(signal: str) -> str:
    """The metrics.jsonl key a ``train_`` signal averages: train_reward_group_std_rel_change -> reward_group_std."""
    key = signal.removeprefix(TRAINING)
    for suffix in ("_rel_change", "_change"):
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


class Monitor:
    """Watches each periodic evaluation: adds the changes from the first one (the base), checks the alarms, and
    tracks the best point by ``keep_best`` (a signal; higher is better unless ``lower_is_better``). Alarms on
    ``train_`` signals watch the training statistics of every iteration instead (``observe_training``), each a mean
    over ``window`` iterations."""

    def __init__(self, alarms: list[Alarm], keep_best: Optional[str] = None, lower_is_better: bool = False,
                 window: int = 3):
        alarms = list(alarms)
        self.alarms = [a for a in alarms if not a.signal.startswith(TRAINING)]
        self.training_alarms = [a for a in alarms if a.signal.startswith(TRAINING)]
        self.keep_best, self.lower_is_better, self.window = keep_best, lower_is_better, window
        self.base: Optional[dict] = None
        self.best: Optional[tuple[int, float]] = None  # (iteration, value)
        self._checked = False  # whether the signals' names were checked against an evaluation's
        self.history: list[dict[str, float]] = []  # the watched training statistics, one row per iteration so far

    def unknown_signals(self, point: dict) -> list[str]:
        """The signals of the alarms and keep_best that ``point`` (an evaluation with its changes) does not report:
        a misspelt name, a judge that is not configured, or a ``_rel_change`` of a signal whose base is 0."""
        wanted = [a.signal for a in self.alarms] + ([self.keep_best] if self.keep_best else [])
        return [s for s in dict.fromkeys(wanted) if s not in point]

    def observe_training(self, done: int, row: dict) -> tuple[dict, list[Firing]]:
        """After iteration ``done`` - 1, with its metrics.jsonl ``row``: ({train_<key>: mean over the last ``window``
        iterations, and from iteration 2 x window on its changes from the first window's mean}, the training
        alarms that fired). A key the row lacks is skipped that iteration (e.g. w2 when no step was taken)."""
        if not self.training_alarms:
            return {}, []
        keys = list(dict.fromkeys(training_key(a.signal) for a in self.training_alarms))
        if not self.history:  # the first row: a key it never reports would leave its alarm silent for ever
            for key in keys:
                if not isinstance(row.get(key), (int, float)):
                    print(f"warning: alarms watch {TRAINING}{key}, but the training rows have no {key!r}, so they can "
                          f"never act (a typo? keys: {', '.join(sorted(k for k in row if not k.startswith('time')))})",
                          flush=True)
        self.history.append({k: float(row[k]) for k in keys if isinstance(row.get(k), (int, float))})
        point = {}
        for key in keys:
            def mean(rows):
                values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
                return sum(values) / len(values) if values else None

            now = mean(self.history[-self.window:])
            if now is None:
                continue
            point[TRAINING + key] = now
            base = mean(self.history[: self.window])
            if len(self.history) >= 2 * self.window and base is not None:  # the two windows share no iteration
                point[f"{TRAINING}{key}_change"] = now - base
                if base != 0:
                    point[f"{TRAINING}{key}_rel_change"] = (now - base) / abs(base)
        return point, [Firing(a, done, point[a.signal]) for a in self.training_alarms if a.fired(point)]

    def resume_training(self, rows: list[dict]) -> None:
        """Pick the training windows up again from a resumed run's metrics.jsonl rows (those before it resumes)."""
        self.history = []
        for row in sorted(rows, key=lambda r: r["iteration"]):
            self.observe_training(row["iteration"] + 1, row)

    def observe(self, iteration: int, point: dict) -> tuple[dict, list[Firing], bool]:
        """(the point with its changes from the base, the alarms that fired, whether this point is the new best).
        The first point observed is the base; a resumed run passes its base again with ``set_base``."""
        if self.base is None:
            self.base = dict(point)
        point = with_changes(point, self.base)
        if not self._checked:  # an alarm on a signal that is never reported would never fire: say so at once
            self._checked = True
            for name in self.unknown_signals(point):
                print(f"warning: alarms/keep_best watch {name!r}, which the periodic evaluation does not report, so "
                      f"it can never act (a typo? signals: {', '.join(sorted(point))})", flush=True)
        firings = [Firing(a, iteration, point[a.signal]) for a in self.alarms if a.fired(point)]
        improved = False
        if self.keep_best is not None and iteration > 0:  # the base is not a policy worth exporting as best/
            value = point.get(self.keep_best)
            if self._better(value):
                self.best, improved = (iteration, value), True
        return point, firings, improved

    def resume(self, rows: list[dict]) -> None:
        """Pick the base and the best up again from a resumed run's eval_metrics.jsonl rows (those up to the
        iteration it resumes from)."""
        rows = sorted(rows, key=lambda r: r["iteration"])
        if rows and rows[0]["iteration"] == 0:
            self.base = {k: v for k, v in rows[0].items() if not k.endswith(("_change", "_rel_change"))}
        for row in rows[1:] if self.keep_best else []:
            value = row.get(self.keep_best)
            if self._better(value):
                self.best = (row["iteration"], value)

    def _better(self, value) -> bool:
        """Whether ``value`` of the keep_best signal beats the best so far (a missing or non-finite one never does)."""
        if value is None or not math.isfinite(value):
            return False
        return self.best is None or (value < self.best[1] if self.lower_is_better else value > self.best[1])
