"""Prompt files and the per-iteration prompt sampler."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


HUB_PREFIX = "hf://datasets/"


def fetch_hub_file(spec: str) -> Path:
    """``hf://datasets/<org>/<name>/<file>`` -> the file, downloaded from the hub dataset (or found in its cache)."""
    from huggingface_hub import hf_hub_download

    parts = spec[len(HUB_PREFIX):].split("/", 2)
    if len(parts) != 3:
        raise ValueError(f"{spec!r}: expected hf://datasets/<org>/<name>/<file.txt|csv|jsonl>")
    try:
        return Path(hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2], repo_type="dataset"))
    except Exception as e:  # offline, missing, gated: say which and what to do
        raise ValueError(f"could not fetch {spec!r} ({type(e).__name__}: {e}). Download the file and pass its local "
                         "path instead (HF_HUB_OFFLINE=1 allows only what is already cached)") from None


def seeded_subset(prompts: list[str], n: int, seed: int) -> list[str]:
    """n of ``prompts`` drawn at random with ``seed``, kept in file order (all of them for n = 0 or n >= len).
    Prompt files are often ordered by category, so a random subset represents them where the first n would not."""
    if not 0 < n < len(prompts):
        return list(prompts)
    keep = np.random.default_rng(seed).permutation(len(prompts))[:n]
    return [prompts[i] for i in sorted(keep)]


def load_prompt_records(path: str | os.PathLike) -> list[dict]:
    """Read a prompt file as one dict per prompt: ``{"prompt": text, **other fields}``. A .jsonl line's other keys and
    a .csv row's other columns are the prompt's metadata, which reaches the scorers that take it (a GenEval-style
    verifiable reward reads what the image must show from there); .txt prompts have none. Accepts what
    ``load_prompts`` accepts; raises ValueError naming the file and line on malformed input."""
    path = fetch_hub_file(str(path)) if str(path).startswith(HUB_PREFIX) else Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8") from None
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: each line needs a string field \"prompt\"")
            records.append({**row, "prompt": row["prompt"].strip()})
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a header row with a 'prompt' column, got {reader.fieldnames}")
        records = [{**{k: v for k, v in row.items() if k is not None}, "prompt": row["prompt"].strip()}
                   for row in reader if row["prompt"] and row["prompt"].strip()]
    else:
        records = [{"prompt": ln.strip()} for ln in text.splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#")]
    if not records:
        raise ValueError(f"{path}: no prompts found; write one prompt per line (.txt: blank lines and lines starting "
                         "with # are skipped; .jsonl / .csv: a \"prompt\" field)")
    return records


def balanced_subset(prompts: list[str], categories: Optional[list[str]], n: int, seed: int) -> list[str]:
    """n of ``prompts`` with their ``categories`` represented as evenly as they can be (one of each category in turn,
    each category's prompts in a seeded random order), kept in file order; without categories, ``seeded_subset``.
    A held-out file where most prompts are of one category still shows every category in a 4-prompt grid."""
    if categories is None:
        return seeded_subset(prompts, n, seed)
    if len(categories) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(categories)} categories")
    rng = np.random.default_rng(seed)
    queues = {c: list(rng.permutation([i for i, ci in enumerate(categories) if ci == c]))
              for c in sorted(set(categories))}
    keep: list[int] = []
    while len(keep) < min(n, len(prompts)):
        for queue in queues.values():
            if queue and len(keep) < n:
                keep.append(int(queue.pop(0)))
    return [prompts[i] for i in sorted(keep)]


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Read prompts from .txt (one per line; blank lines and '#' comments skipped), .jsonl (a "prompt" field per
    line) or .csv (a "prompt" column), or a file of a hub dataset given as ``hf://datasets/<org>/<name>/<file>``
    (e.g. a CSV export of DrawBench). Raises ValueError naming the file and line on malformed input."""
    return [r["prompt"] for r in load_prompt_records(path)]


def prompt_metadata(records: list[dict], where: str = "the prompt file") -> dict[str, dict]:
    """prompt -> its fields besides ``prompt`` (what the scorers get per image). A prompt listed twice must carry the
    same fields: a sample knows its prompt's text, not its line."""
    out: dict[str, dict] = {}
    for r in records:
        fields = {k: v for k, v in r.items() if k != "prompt"}
        if r["prompt"] in out and out[r["prompt"]] != fields:
            raise ValueError(f"{where}: the prompt {r['prompt']!r} appears twice with different fields "
                             f"({out[r['prompt']]} and {fields}); give each prompt one row")
        out[r["prompt"]] = fields
    return out


class PromptSampler:
    """Draws ``n`` distinct prompts per call: passes over the list in a seeded random order, reshuffled every pass.

    Its whole state is (epoch, position), so a resumed run continues the same sequence.
    """

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts, self.seed = list(prompts), seed
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next(self, n: int) -> list[str]:
        if n > len(self.prompts):
            raise ValueError(f"asked for {n} distinct prompts per iteration but the prompt file has "
                             f"{len(self.prompts)}; lower prompts_per_iteration")
        if self.position + n > len(self.prompts):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order(self.epoch)[self.position : self.position + n]
        self.position += n
        return [self.prompts[i] for i in idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
