"""Before/after evaluation on held-out prompts: ClipScore, ClipDiversity, the judges' scores, paired intervals.

Base and trained policy are sampled from the *same* noise (fixed seeds), so every difference is paired: per image for
ClipScore and the judges, per prompt for diversity. Intervals are percentile bootstraps that resample prompts (the
images of one prompt are not independent), so they are honest about where the variance comes from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from sd3_adrpo.io import atomic_write_bytes, atomic_write_json, image_grid, save_png
from sd3_adrpo.metrics.base import call_scorer
from sd3_adrpo.metrics.clip import clip_scores  # noqa: F401 - the one CLIP score (re-exported for its users)
from sd3_adrpo.rollout import SD3Sampler, make_generator

if TYPE_CHECKING:
    from sd3_adrpo.metrics import ClipScore, Metric

EVAL_NOISE = 3  # random stream of evaluation samples (see trainer's ROLLOUT_NOISE, LOSS_NOISE, GRID_NOISE)
W2_NOISE = 4  # random stream of the (sigma, noise) draws of the W2 divergence
DIVERSITY_DEFAULT = "cosine"


def clip_diversity(img_emb: torch.Tensor, group_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean pairwise distance among the images of each prompt, one value per group (sorted group id).

    Two candidates, since the paper's exact variant is unpublished: ``cosine`` = 100 * (1 - cos) (scale-free; the
    default) and ``l2`` = Euclidean distance of the raw (unnormalised) embeddings.
    """
    out = {"cosine": [], "l2": []}
    for g in torch.unique(group_ids):
        e = img_emb[group_ids == g].double()
        if len(e) < 2:
            raise ValueError("ClipDiversity needs at least 2 images per prompt")
        iu = torch.triu_indices(len(e), len(e), offset=1)
        n = torch.nn.functional.normalize(e, dim=-1)
        out["cosine"].append(float((100 * (1 - n @ n.T))[iu[0], iu[1]].mean()))
        out["l2"].append(float(torch.cdist(e, e)[iu[0], iu[1]].mean()))
    return {k: np.array(v) for k, v in out.items()}


def paired_bootstrap(before: np.ndarray, after: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of (after - before) over clusters (prompts) and its percentile bootstrap interval over clusters."""
    diff = np.asarray(after, float) - np.asarray(before, float)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"before": float(np.mean(before)), "after": float(np.mean(after)), "diff": float(diff.mean()),
            "ci_low": float(lo), "ci_high": float(hi), "level": level, "n_clusters": len(diff)}


def build_judges(specs: list[str], device: torch.device | str = "cpu") -> dict[str, "Metric"]:
    """The judges named by ``specs`` (``NAME`` or ``NAME@WEIGHTS``: a registry name, ``package.module:Class``,
    ``file.py:Class`` or a reward server's URL; ``{NAME: {model: ..., <option>: ...}}`` for options), keyed by the
    column each reports. Judges are scorers the policy is not trained on, e.g. the tiny world's oracle
    (``tinyworld.scorers:Oracle``) or PickScore on SD3; any reward can be one."""
    from sd3_adrpo.metrics import build_metric
    from sd3_adrpo.reward_spec import judge_term

    judges = {}
    for spec in specs:
        term = judge_term(spec)
        judge = build_metric(term.spec, term.model, device=device, **term.options)
        if judge.column in judges:
            raise ValueError(f"two judges report the column {judge.column!r}: name each once")
        judges[judge.column] = judge
    return judges


def prompt_categories_of(judge, prompts: list[str], rows: Optional[list[dict]] = None) -> Optional[list[str]]:
    """``judge.categories(prompts)``, with ``metadata=rows`` for a judge whose categories take them (a GenEval-style
    row's tag)."""
    import inspect

    if rows is not None and "metadata" in inspect.signature(judge.categories).parameters:
        return judge.categories(prompts, metadata=rows)
    return judge.categories(prompts)


def judge_images(judges: dict, images: np.ndarray, prompts: list[str],
                 metadata: Optional[dict] = None) -> tuple[dict[str, np.ndarray], Optional[list[str]]]:
    """Each judge's per-image scores, and the per-image categories of the first judge that sorts prompts into any.
    ``metadata``: {prompt: the other fields of its row}, for judges that take them (GenEval-style rows). A judge that
    is unavailable (its reward server down) scores NaN, with a warning: an evaluation is never what stops a run."""
    from sd3_adrpo.metrics import ScorerUnavailable

    rows = [metadata.get(p, {}) for p in prompts] if metadata else None
    scores = {}
    for key, judge in judges.items():
        try:
            scores[key] = call_scorer(judge, images, prompts, rows)
        except ScorerUnavailable as e:
            print(f"warning: judge {key!r} is unavailable ({e}); its scores are NaN", flush=True)
            scores[key] = np.full(len(prompts), np.nan)
    for key, values in scores.items():
        if values.shape != (len(prompts),):
            raise ValueError(f"judge {key!r} returned shape {values.shape} for {len(prompts)} images; a judge must "
                             "return one number per image")
    category = next((c for c in (prompt_categories_of(j, prompts, rows) for j in judges.values()) if c is not None),
                    None)
    return scores, category


@dataclass
class PolicyEval:
    """Per-image and per-prompt results of one policy on one prompt set and seed."""

    prompts: list[str]  # one per image, prompt-major
    images: np.ndarray  # (B, H, W, 3) uint8
    clip_score: np.ndarray  # (B,)
    judged: dict[str, np.ndarray]  # judge column -> (B,) scores
    category: Optional[list[str]]  # (B,) from a judge that sorts prompts into categories, else None
    diversity: dict[str, np.ndarray]  # per prompt
    w2: Optional[dict[str, np.ndarray]] = None  # ``w2_divergence``'s (B,) values per field, if asked for

    def per_prompt(self, values: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(values, float).reshape(-1, k).mean(axis=1)


@torch.no_grad()
def w2_divergence(transformer, rollout, generator: torch.Generator, first: int = 0,
                  total: Optional[int] = None) -> dict[str, np.ndarray]:
    """||v_theta - v_ref||^2 (mean over elements) per sample of ``rollout`` at one uniform (sigma, noise) draw each,
    v_ref being the same transformer with its adapters disabled. The draws are those of samples ``first`` onwards of
    ``total`` (default: this rollout alone), so a shard of an evaluation gets the draws it has in the whole.

    - ``w2_divergence``: of the guided field v_u + w (v_c - v_u) at the rollout's guidance scale, the policy that is
      actually sampled (the conditional field when the rollout had no CFG);
    - ``w2_divergence_conditional``: of v_c alone (what the regulariser sees under loss_guidance: conditional);
    - ``w2_divergence_unconditional``: of the empty-prompt branch v_u (with CFG only).
    """
    from sd3_adrpo.losses import noised, per_sample_mse
    from sd3_adrpo.update import policy_and_reference

    latents = rollout.latents.float()
    n, total = len(latents), total or len(latents)
    noise = torch.randn((total, *latents.shape[1:]), generator=generator)[first : first + n].to(latents)
    sigmas = torch.rand(total, generator=generator)[first : first + n].to(latents.device)
    x_t, _ = noised(latents, noise, sigmas)
    # the fields the guided loss compares (loss_guidance: guided), with its per-branch W2 terms
    with torch.no_grad():
        v_theta, v_ref, terms = policy_and_reference(transformer, transformer, x_t, sigmas, rollout.prompt_embeds,
                                                     rollout.pooled_embeds,
                                                     (rollout.uncond_embeds, rollout.guidance_scale), rollout.family)
    guided = per_sample_mse(v_theta, v_ref)
    out = {"w2_divergence": guided, "w2_divergence_conditional": terms.get("w2_conditional", guided)}
    if "w2_unconditional" in terms:
        out["w2_divergence_unconditional"] = terms["w2_unconditional"]
    return {k: v.cpu().numpy() for k, v in out.items()}


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of process ``rank``'s contiguous share of n items (shares differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


@torch.no_grad()
def evaluate_policy(sampler: SD3Sampler, clip: "ClipScore", prompts: list[str], images_per_prompt: int,
                    resolution: int, seed: int, with_w2: bool = False, shard: tuple[int, int] = (0, 1),
                    judges: Optional[dict] = None, chunk_prompts: Optional[int] = None,
                    progress: Optional[str] = None, metadata: Optional[dict] = None) -> PolicyEval:
    """Sample ``images_per_prompt`` images per prompt from the sampler's current policy (fixed noise) and score them
    with the CLIP and every judge (``build_judges``); ``with_w2`` also measures the W2 divergence to the reference on
    those samples. ``shard=(rank, world)`` evaluates only process ``rank``'s share of the prompts, each with the noise
    it has in the whole evaluation, so ``merge_shards`` of all shards is the unsharded result.

    Prompts are sampled and scored ``chunk_prompts`` at a time (default: as many as fill one batch of the sampler,
    so the sampler's batches are those of a single call), so the latents and embeddings held at once do not grow
    with the prompt set; only the uint8 images and the scores are kept. ``progress``: a progress bar's title (None:
    no bar; the caller passes one on the main process only). ``metadata``: {prompt: its row's other fields}, for the
    judges that take them."""
    k, n_all = images_per_prompt, len(prompts) * images_per_prompt
    start, stop = shard_bounds(len(prompts), *shard)
    noise = torch.randn((len(prompts) * k, *sampler.latent_shape(resolution)),
                        generator=make_generator(seed, 0, EVAL_NOISE))[start * k : stop * k]
    prompts = prompts[start:stop]
    if not prompts:  # more processes than prompts
        return PolicyEval(prompts=[], images=np.zeros((0, resolution, resolution, 3), np.uint8), clip_score=np.zeros(0),
                          judged={key: np.zeros(0) for key in judges or {}}, category=None,
                          diversity={"cosine": np.zeros(0), "l2": np.zeros(0)})
    chunk = chunk_prompts or max(1, sampler.batch_size // k)
    parts = []
    from tqdm.auto import tqdm

    for c in tqdm(range(0, len(prompts), chunk), desc=progress, disable=progress is None, unit="batch"):
        rollout = sampler.sample(prompts[c : c + chunk], k, resolution, noise=noise[c * k : (c + chunk) * k])
        img = torch.cat([clip.embed_images(rollout.images[s : s + 64]) for s in range(0, len(rollout.prompts), 64)])
        txt_unique = clip.embed_texts(prompts[c : c + chunk])
        txt = txt_unique[rollout.group_ids.to(txt_unique.device)]
        judged, category = judge_images(judges or {}, rollout.images.numpy(), rollout.prompts, metadata)
        w2 = (w2_divergence(sampler.pipe.transformer, rollout, make_generator(seed, 0, W2_NOISE), (start + c) * k,
                            n_all) if with_w2 else None)
        parts.append(PolicyEval(prompts=rollout.prompts, images=rollout.images.numpy(),
                                clip_score=clip_scores(img, txt).cpu().numpy(), judged=judged, category=category,
                                diversity=clip_diversity(img.cpu(), rollout.group_ids), w2=w2))
    return merge_shards(parts)


def merge_shards(shards: list[PolicyEval]) -> PolicyEval:
    """One PolicyEval from the shards of ``evaluate_policy`` in rank order (empty shards are skipped)."""
    shards = [s for s in shards if s.prompts]
    if len(shards) == 1:
        return shards[0]

    def cat(field):
        values = [getattr(s, field) for s in shards]
        return None if values[0] is None else np.concatenate(values)

    return PolicyEval(prompts=[p for s in shards for p in s.prompts], images=cat("images"),
                      clip_score=cat("clip_score"),
                      judged={key: np.concatenate([s.judged[key] for s in shards]) for key in shards[0].judged},
                      category=None if shards[0].category is None else [c for s in shards for c in s.category],
                      diversity={name: np.concatenate([s.diversity[name] for s in shards]) for name in shards[0].diversity},
                      w2=None if shards[0].w2 is None else {k: np.concatenate([s.w2[k] for s in shards])
                                                            for k in shards[0].w2})


def compare(base: PolicyEval, trained: PolicyEval, images_per_prompt: int, seed: int = 0) -> dict:
    """Paired differences trained - base, each with a bootstrap interval over prompts."""
    k = images_per_prompt
    summary = {
        "clip_score": paired_bootstrap(base.per_prompt(base.clip_score, k), trained.per_prompt(trained.clip_score, k),
                                       seed=seed),
        "clip_diversity_default": DIVERSITY_DEFAULT,
    }
    for name in base.diversity:
        summary[f"clip_diversity_{name}"] = paired_bootstrap(base.diversity[name], trained.diversity[name], seed=seed)
    for key, values in (trained.w2 or {}).items():  # the base is the reference: its W2 is 0 by definition
        per_prompt = trained.per_prompt(values, k)
        summary[key] = paired_bootstrap(np.zeros_like(per_prompt), per_prompt, seed=seed)
    for key in base.judged:
        b, t = base.per_prompt(base.judged[key], k), trained.per_prompt(trained.judged[key], k)
        summary[key] = paired_bootstrap(b, t, seed=seed)
        if base.category is not None:
            cats = np.array(base.category[::k])
            for c in sorted(set(cats)):
                summary[f"{key}_{c}"] = paired_bootstrap(b[cats == c], t[cats == c], seed=seed)
    return summary


def _markdown(summary: dict, meta: dict) -> str:
    where = f" on {meta['prompts_file']}" if meta.get("prompts_file") else ""
    lines = [f"# Evaluation{where}: base vs trained\n",
             f"{meta['num_prompts']} prompts x {meta['images_per_prompt']} images, the same seeds for both; "
             f"differences are trained - base with {int(100 * meta['level'])}% bootstrap intervals over prompts. "
             f"ClipDiversity default: {summary['clip_diversity_default']}.\n",
             "| metric | base | trained | difference | interval |", "|---|---|---|---|---|"]
    for name, row in summary.items():
        if isinstance(row, dict):
            lines.append(f"| {name} | {row['before']:.4g} | {row['after']:.4g} | {row['diff']:+.4g} | "
                         f"[{row['ci_low']:+.4g}, {row['ci_high']:+.4g}] |")
    return "\n".join(lines) + "\n"


def write_results(out: str | os.PathLike, base: PolicyEval, trained: PolicyEval, images_per_prompt: int,
                  extra: Optional[dict] = None) -> dict:
    """Write ``summary.json``/``summary.md``, per-image scores (``eval_images.jsonl``) and before/after grids."""
    out = Path(out)
    summary = compare(base, trained, images_per_prompt)
    meta = {"num_prompts": len(base.prompts) // images_per_prompt, "images_per_prompt": images_per_prompt,
            "level": summary["clip_score"]["level"], **(extra or {})}
    rows = []
    for i, prompt in enumerate(base.prompts):
        row = {"index": i, "prompt": prompt, "clip_score_base": float(base.clip_score[i]),
               "clip_score_trained": float(trained.clip_score[i])}
        if base.category is not None:
            row["category"] = base.category[i]
        for key in base.judged:
            row.update({f"{key}_base": float(base.judged[key][i]), f"{key}_trained": float(trained.judged[key][i])})
        row.update({key: float(values[i]) for key, values in (trained.w2 or {}).items()})
        rows.append(json.dumps(row))
    atomic_write_bytes(out / "eval_images.jsonl", ("\n".join(rows) + "\n").encode())
    atomic_write_json(out / "summary.json", {"meta": meta, "metrics": summary})
    atomic_write_bytes(out / "summary.md", _markdown(summary, meta).encode())
    n = min(8, len(base.prompts) // images_per_prompt) * images_per_prompt
    for name, ev in (("base", base), ("trained", trained)):
        save_png(out / "samples" / f"eval_{name}.png", image_grid(ev.images[:n], images_per_prompt))
    return summary
