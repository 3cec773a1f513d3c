"""Training checkpoints: LoRA, optimizer, LR scheduler, loop position and RNG states, as safetensors + JSON.

A checkpoint is written into a temporary folder and renamed into place, with a manifest of file sizes and hashes;
only the newest ``keep`` are kept. Nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sd3_adrpo.io import atomic_write_bytes, atomic_write_json, read_jsonl, replace_folder

PREFIX = "checkpoint-"
REQUIRED_FILES = {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors keyed by 'param/name[/sub...]', JSON meta). Nested dicts (e.g. bitsandbytes'
    8-bit quantisation state) are flattened too."""
    tensors, scalars = {}, {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        else:
            scalars[prefix] = value

    for idx, per_param in state["state"].items():
        walk(str(idx), per_param)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, *path = key.split("/")
        node = state.setdefault(int(idx), {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": repr(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import ast

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(ast.literal_eval(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: str | os.PathLike, step_name: int, model, optimizer, lr_scheduler, trainer_state: dict,
                    keep: int, export: Optional[Callable[[Path], None]] = None) -> Path:
    """Atomically write ``root/checkpoint-<step_name>`` and delete all but the newest ``keep`` checkpoints.
    ``export(folder)`` writes more files into it before the manifest is taken (the trainer's: the policy as a
    diffusers LoRA with its config.yaml, so that ``eval/table1.py --run name=<checkpoint>`` evaluates it)."""
    root = Path(root)
    final = root / f"{PREFIX}{step_name:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    atomic_write_json(tmp / "state.json", {"trainer": trainer_state, "optimizer": opt_meta, "rng": rng_meta,
                                           "lr_scheduler": lr_scheduler.state_dict()})
    if export is not None:
        export(tmp)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    atomic_write_json(tmp / "manifest.json", manifest)
    replace_folder(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def snapshot(model, optimizer, lr_scheduler, trainer_state: dict) -> dict:
    """An in-memory copy (on the CPU) of what a checkpoint holds, to fall back on if the next update diverges."""
    def cpu(x):
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: cpu(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cpu(v) for v in x)
        return x

    return {"trainable": cpu(trainable_state(model)), "optimizer": cpu(optimizer.state_dict()),
            "lr_scheduler": cpu(lr_scheduler.state_dict()), "trainer": cpu(trainer_state)}


def restore(snap: dict, model, optimizer, lr_scheduler) -> dict:
    """Put a ``snapshot`` back into the model, optimizer and scheduler; returns its trainer state."""
    model.load_state_dict(snap["trainable"], strict=False)
    optimizer.load_state_dict(snap["optimizer"])
    lr_scheduler.load_state_dict(snap["lr_scheduler"])
    return snap["trainer"]


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []


def verify_checkpoint(path: Path) -> None:
    """Raise ValueError if a file listed in the manifest is missing, truncated or altered."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{path}: no manifest.json (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: manifest.json is not JSON") from None
    if not (isinstance(manifest, dict) and REQUIRED_FILES <= manifest.keys() and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in manifest.values())):
        raise ValueError(f"{path}: manifest.json does not list {', '.join(sorted(REQUIRED_FILES))} with their sizes "
                         "and hashes")
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise ValueError(f"{path}: {name} is missing or corrupt")


def load_checkpoint(path: str | os.PathLike, model, optimizer, lr_scheduler) -> dict:
    """Restore model trainables, optimizer, scheduler and RNG from ``path``; return the trainer state dict."""
    path = Path(path)
    verify_checkpoint(path)
    trainables = load_file(path / "trainable.safetensors")
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainables) != expected:
        raise ValueError(f"{path}: its trainable weights do not match this model's LoRA (different rank/targets?)")
    model.load_state_dict(trainables, strict=False)
    meta = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"]))
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    _set_rng_state(load_file(path / "rng.safetensors"), meta["rng"])
    return meta["trainer"]


def find_resume_checkpoint(resume_from: str, output_dir: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``resume_from`` itself, or for 'latest' the newest intact checkpoint under
    ``output_dir/checkpoints`` (a corrupt newest one is skipped with a warning)."""
    root = Path(output_dir) / "checkpoints"
    candidates = list_checkpoints(root) if resume_from == "latest" else [Path(resume_from)]
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
            return path
        except ValueError as e:
            print(f"warning: not resuming from {path}: {e}; trying the previous checkpoint")
    raise ValueError(f"resume_from {resume_from}: no intact checkpoint "
                     f"{'under ' + str(root) if resume_from == 'latest' else 'there'}")


def truncate_metrics(path: str | os.PathLike, iteration: int) -> None:
    """After a resume, drop metric rows at or past the restored iteration (so the log has no duplicates), and a torn
    last line with them (``read_jsonl``), so that new rows are not appended to half a line."""
    path = Path(path)
    if path.is_file():
        rows = [r for r in read_jsonl(path) if r["iteration"] < iteration]
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
