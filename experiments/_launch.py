"""What the tiny-world sweep and reproduction scripts share: one training or evaluation as a logged subprocess (so
several can run side by side, each with its own torch thread count), the equal-compute rule for DPO, and how an
existing run is found stale: its saved settings compared with a command's, and the fingerprint of the files it read.

Run folders (LoRAs, per-iteration logs, each run's config.yaml and input records) stay local; what is committed of an
experiment is its tables and one compact record, ``run_records.json`` in its output folder: every run's settings and
input fingerprints as it was trained and evaluated. A driver's ``--check`` compares that record with what the current
code would run, so a fresh clone, which has no run folders, can still tell whether the committed results are current."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from sd3_adrpo.config import TrainConfig, parse_args
from sd3_adrpo.io import atomic_write_json
from sd3_adrpo.methods import unused_knobs

ROOT = Path(__file__).resolve().parents[1]

RECORDS = "run_records.json"  # under an experiment's --out: {run: its settings and input fingerprints}

# where a run is written, whether it may replace a folder, what it resumes from, how a batch is divided over
# processes and which judges score it: none of them changes what the run learns (runs from before the judges key
# were judged by the tiny world's oracle all the same)
NOT_LEARNING_SETTINGS = {"output_dir", "overwrite_output_dir", "resume_from", "split_batches", "judges"}


def cpu_kernels() -> str:
    """The CPU and the vector kernels torch dispatches to on it, e.g. 'AMD EPYC, AVX2': the same code, settings and
    thread count can train another run on another machine (the frontier's 2026-12-02 runs do not retrain bitwise on
    later ones: results/tinyworld_frontier/README.md), so a record names the machine it was trained on."""
    import platform

    import torch

    names = [line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
             if line.startswith("model name")]
    model = names[0] if names else platform.processor() or platform.machine()
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def _read(path: str) -> str:
    """A text file's contents, '' where it cannot be read (e.g. /proc off Linux)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cli_overrides(overrides: dict) -> list[str]:
    """{key: value} -> ["--key", "value", ...] as train_sd3_adrpo.py parses them (lists and booleans as JSON,
    None as null)."""
    argv = []
    for k, v in overrides.items():
        argv += [f"--{k}", "null" if v is None else json.dumps(v) if isinstance(v, (list, bool)) else str(v)]
    return argv


def equal_compute_overrides(method: str, cfg) -> dict:
    """DPO trains on one (winner, loser) pair per prompt instead of samples_per_prompt samples: samples_per_prompt / 2
    times the inner epochs give it the other methods' number of optimizer steps and sample-forwards."""
    if method == "dpo":
        return {"inner_epochs": max(1, cfg.samples_per_prompt // 2) * cfg.inner_epochs}
    return {}


def run_logged(cmd: list[str], log: Path, threads: int = 0) -> None:
    """Run ``python cmd...`` from the repository root with its output in ``log``; ``threads`` > 0 sets OMP_NUM_THREADS
    (torch's intra-op threads). Raises with the log's path when it fails."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[0]} failed (rc {rc}); full log: {log}\n{tail}")


def saved_settings(saved_config: Path) -> dict:
    """The settings a trainer saved in a run's config.yaml."""
    return yaml.safe_load(saved_config.read_text())


def changed_settings(saved_config: Path | dict, argv: list[str]) -> list[str]:
    """The settings in which the run whose trainer wrote ``saved_config`` (its config.yaml, or those settings as a
    dict, as a run record keeps them) differs from what ``train_sd3_adrpo.py argv`` would train, sorted; fields only
    another method reads are ignored, so that tuning one baseline does not make the other methods' runs stale."""
    saved = saved_config if isinstance(saved_config, dict) else saved_settings(saved_config)
    want = dataclasses.asdict(parse_args(argv))
    ignore = NOT_LEARNING_SETTINGS | unused_knobs(want["method"])
    # a setting added after a run was trained is missing from its record; a new setting's default keeps the earlier
    # behaviour (e.g. loss_guidance: conditional), so a missing setting counts as its default
    defaults = dataclasses.asdict(TrainConfig())
    return sorted(k for k in want.keys() | saved.keys()
                  if k not in ignore and saved.get(k, defaults.get(k)) != want.get(k))


def input_fingerprint(*paths: Optional[str]) -> dict[str, str]:
    """sha256 of each local file or folder a run reads besides its settings (weights, configs, prompt files; model
    cards excluded), so that a retrained base model or an edited prompt file makes an existing run stale even though
    its path did not change. A hub id, which is not a local path, stands for itself."""
    out = {}
    for p in filter(None, paths):
        path = Path(p) if Path(p).is_absolute() else ROOT / p
        if not path.exists():
            out[p] = "not a local path"
            continue
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix != ".md") if path.is_dir() else [path]
        digest = hashlib.sha256()
        for f in files:
            digest.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
            digest.update(hashlib.sha256(f.read_bytes()).digest())
        out[p] = digest.hexdigest()
    return out


def read_records(out: Path) -> dict:
    """An experiment's committed run records (``out/run_records.json``), {} if it has none."""
    path = out / RECORDS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_records(out: Path, records: dict) -> None:
    """Write an experiment's run records, indented with sorted keys so that a rerun's diff shows what changed."""
    atomic_write_json(out / RECORDS, records)


def report_check(problems: list[str], checked: int, out: Path) -> None:
    """End a ``--check``: exit 0 with one line when every run is current, else exit 1 naming each run that is not:
    first those recorded with other settings or inputs (stale), then those not recorded at all (not run yet: a
    partial record, e.g. an experiment longer than one session, is current as far as it goes)."""
    unrun = [p.split(":", 1)[0] for p in problems if p.endswith(f": not in {RECORDS}")]
    stale = [p for p in problems if not p.endswith(f": not in {RECORDS}")]
    if problems:
        raise SystemExit("\n".join(
            ([f"{len(stale)} of {checked} run(s) recorded in {out / RECORDS} are not what this command would run:\n  "
              + "\n  ".join(stale)] if stale else
             [f"the {checked - len(unrun)} run(s) recorded in {out / RECORDS} are current"])
            + ([f"{len(unrun)} of {checked} run(s) are not run yet (no record): {', '.join(unrun)}"] if unrun else [])))
    print(f"all {checked} run(s) recorded in {out / RECORDS} are current: same settings and the same files behind "
          "their inputs as this command would use")
