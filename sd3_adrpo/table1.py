"""Table 1 end to end: generate images for each method (saved with a manifest, never regenerated), score them with
every metric whose weights are given, and write per-image JSONL, per-run JSON and the table (Markdown, CSV, LaTeX).

Rows: the base pipeline (SD3/SD3.5, FLUX.1 or SANA: a trainable family, ``sd3_adrpo.families``), the base + each
LoRA run, and other text-to-image pipelines (any diffusers folder or hub id) as extra rows. Command line:
``python eval/table1.py --help``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from sd3_adrpo.evaluation import (DIVERSITY_DEFAULT, EVAL_NOISE, W2_NOISE, build_judges, clip_diversity, clip_scores,
                                  w2_divergence)
from sd3_adrpo.families import family_for_pipeline
from sd3_adrpo.io import atomic_write_bytes, atomic_write_json, save_png
from sd3_adrpo.models import DTYPES, load_pipeline
from sd3_adrpo.prompts import load_prompt_records, prompt_metadata, seeded_subset
from sd3_adrpo.rollout import SD3Sampler, make_generator
from sd3_adrpo.tables import Table, mean_and_se

@dataclass(frozen=True)
class Settings:
    """Everything that determines the generated images; a manifest with other settings is regenerated."""

    source: str  # pipeline hub id / folder
    lora: Optional[str]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    images_per_prompt: int
    steps: int
    guidance_scale: float
    resolution: int


def _spec(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise SystemExit(f"error: expected LABEL=PATH, got {text!r}")
    label, value = text.split("=", 1)
    return label, value


def _image_path(root: Path, label: str, seed: int, p: int, j: int) -> Path:
    return root / "images" / label / f"seed{seed}" / f"p{p:04d}_{j}.png"


def generate(out: Path, label: str, settings: Settings, *, pipe=None, drop_t5: bool = False, dtype=torch.float32,
             device="cpu", max_sequence_length: int = 256, batch_size: int = 16) -> dict:
    """Generate (or reuse) the images of one row; returns its manifest. ``pipe`` is the loaded base pipeline for
    the base and LoRA rows, None for another pipeline (loaded here from ``settings.source``)."""
    manifest_path = out / "images" / label / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["settings"] == json.loads(json.dumps(asdict(settings))) and all(
                (out / f["file"]).is_file() for f in manifest["files"]):
            return manifest
    files = []
    if pipe is not None:  # the base pipeline, with or without a LoRA: our sampler (same output as the stock call)
        if settings.lora:
            pipe.load_lora_weights(settings.lora, adapter_name=label)
        sampler = SD3Sampler(pipe.to(device), device, num_inference_steps=settings.steps,
                             guidance_scale=settings.guidance_scale, max_sequence_length=max_sequence_length,
                             batch_size=batch_size)
        k, n_all = settings.images_per_prompt, len(settings.prompts) * settings.images_per_prompt
        chunk = max(1, batch_size // k)  # prompts per sampler call: one batch's latents and embeddings at a time
        bar = tqdm(total=len(settings.seeds) * -(-len(settings.prompts) // chunk), desc=f"generate {label}",
                   unit="batch")
        for seed in settings.seeds:
            noise = torch.randn((n_all, *sampler.latent_shape(settings.resolution)),
                                generator=make_generator(seed, 0, EVAL_NOISE))  # as one call would draw it
            for c in range(0, len(settings.prompts), chunk):
                rollout = sampler.sample(list(settings.prompts[c : c + chunk]), k, settings.resolution,
                                         noise=noise[c * k : (c + chunk) * k])
                w2 = (w2_divergence(pipe.transformer, rollout, make_generator(seed, 0, W2_NOISE), c * k, n_all)
                      if settings.lora else {"w2_divergence": np.zeros(len(rollout.prompts))})
                for i, image in enumerate(rollout.images.numpy()):
                    p, j = divmod(c * k + i, k)
                    path = _image_path(out, label, seed, p, j)
                    save_png(path, image)
                    files.append({"file": str(path.relative_to(out)), "seed": seed, "prompt_index": p, "j": j,
                                  "prompt": settings.prompts[p], **{name: float(v[i]) for name, v in w2.items()}})
                bar.update()
        bar.close()
        if settings.lora:
            pipe.delete_adapters(label)
    else:  # any other diffusers text-to-image pipeline, through its own __call__
        from diffusers import DiffusionPipeline

        # components saved as [null, null] (e.g. an SD3 folder without T5) must be passed as None explicitly
        absent = {k: None for k, v in DiffusionPipeline.load_config(settings.source).items()
                  if isinstance(v, list) and v[0] is None}
        pipe = DiffusionPipeline.from_pretrained(settings.source, dtype=dtype, **absent).to(device)
        pipe.set_progress_bar_config(disable=True)
        bar = tqdm(total=len(settings.seeds) * len(settings.prompts), desc=f"generate {label}", unit="prompt")
        for seed in settings.seeds:
            for p, prompt in enumerate(settings.prompts):
                images = pipe(prompt, num_images_per_prompt=settings.images_per_prompt, output_type="np",
                              num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                              height=settings.resolution, width=settings.resolution,
                              generator=torch.Generator().manual_seed(seed * 1_000_003 + p)).images
                for j, image in enumerate(images):
                    path = _image_path(out, label, seed, p, j)
                    save_png(path, (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
                    files.append({"file": str(path.relative_to(out)), "seed": seed, "prompt_index": p, "j": j,
                                  "prompt": prompt})
                bar.update()
        bar.close()
    manifest = {"label": label, "settings": asdict(settings), "files": files}
    atomic_write_json(manifest_path, manifest)
    return manifest


def _load_images(out: Path, files: list[dict]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(out / f["file"]).convert("RGB")) for f in files])


def score(out: Path, manifest: dict, clip=None, metrics: Optional[dict] = None, batch_size: int = 64,
          metadata: Optional[dict] = None) -> list[dict]:
    """Per-image scores of one row: ClipScore, every given metric and judge (keyed by its column), W2, and each
    image's ``category`` where a metric sorts prompts into categories. ``metadata``: {prompt: the other fields of its
    row in the prompt file}, for metrics that verify images by them (GenEval-style rows)."""
    from sd3_adrpo.evaluation import prompt_categories_of
    from sd3_adrpo.metrics.base import call_scorer

    files, metrics = manifest["files"], metrics or {}
    rows = [dict(f) for f in files]
    for s in tqdm(range(0, len(files), batch_size), desc=f"score {manifest['label']}"):
        chunk, prompts = files[s : s + batch_size], [f["prompt"] for f in files[s : s + batch_size]]
        images = _load_images(out, chunk)
        if clip is not None:
            img, txt = clip.embed_images(images), clip.embed_texts(prompts)
            for r, cs, e in zip(rows[s : s + batch_size], clip_scores(img, txt).tolist(), img.cpu().tolist()):
                r["clip_score"], r["_embedding"] = cs, e
        fields = [metadata.get(p, {}) for p in prompts] if metadata else None
        for name, metric in metrics.items():
            for r, v in zip(rows[s : s + batch_size], call_scorer(metric, images, prompts, fields)):
                r[name] = float(v)
            categories = prompt_categories_of(metric, prompts, fields)
            for r, c in zip(rows[s : s + batch_size], categories or ()):
                r.setdefault("category", c)
    return rows


_NOT_METRICS = ("file", "seed", "prompt_index", "j", "prompt", "_embedding", "category")


def aggregate(rows: list[dict], breakdown: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """Per-seed values of each metric: the mean over images (those in ``breakdown`` also per prompt category, as
    ``<metric>_<category>``), and ClipDiversity as the mean over prompts."""
    per_seed: dict[str, list[float]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        for key in (k for k in rs[0] if k not in _NOT_METRICS):
            per_seed.setdefault(key, []).append(float(np.mean([r[key] for r in rs])))
        for key in breakdown:
            for category in dict.fromkeys(r["category"] for r in rs if "category" in r):
                per_seed.setdefault(f"{key}_{category}", []).append(
                    float(np.mean([r[key] for r in rs if r.get("category") == category])))
        if "_embedding" in rs[0]:
            div = clip_diversity(torch.tensor([r["_embedding"] for r in rs]),
                                 torch.tensor([r["prompt_index"] for r in rs]))
            per_seed.setdefault("clip_diversity", []).append(float(div[DIVERSITY_DEFAULT].mean()))
            for name, values in div.items():
                per_seed.setdefault(f"clip_diversity_{name}", []).append(float(values.mean()))
    return per_seed


def per_prompt_values(rows: list[dict], breakdown: tuple[str, ...] = ()) -> dict[str, dict[int, float]]:
    """Each metric's value per prompt (the mean over seeds and images; ClipDiversity: the prompt's diversity, averaged
    over seeds), and each broken-down metric's per category (``<metric>_<category>``, over that category's prompts):
    what a paired comparison of two rows that share their noise resamples."""
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    out = {key: {p: float(np.mean([r[key] for r in rs])) for p, rs in by_prompt.items()}
           for key in rows[0] if key not in _NOT_METRICS}
    for key in breakdown:
        for category in dict.fromkeys(r["category"] for r in rows if "category" in r):
            out[f"{key}_{category}"] = {p: v for p, v in out[key].items() if by_prompt[p][0].get("category") == category}
    if "_embedding" in rows[0]:
        per_seed = []
        for seed in sorted({r["seed"] for r in rows}):
            rs = [r for r in rows if r["seed"] == seed]
            ids = torch.tensor([r["prompt_index"] for r in rs])
            div = clip_diversity(torch.tensor([r["_embedding"] for r in rs]), ids)[DIVERSITY_DEFAULT]
            per_seed.append(dict(zip(torch.unique(ids).tolist(), div)))
        out["clip_diversity"] = {p: float(np.mean([d[p] for d in per_seed])) for p in per_seed[0]}
    return out


def paired_comparisons(values: dict[str, dict[str, dict[int, float]]]) -> "Callable[[str, str, str], Optional[dict]]":
    """``paired(metric, a, b)``: the mean over prompts of a - b, with a bootstrap interval over prompts, for rows a and
    b in ``values`` (rows whose images share their noise: the same seeds, prompts and starting latents); None for a
    row outside it or a metric one of them lacks."""
    from sd3_adrpo.evaluation import paired_bootstrap

    cache: dict[tuple, Optional[dict]] = {}

    def paired(metric: str, a: str, b: str) -> Optional[dict]:
        if (metric, a, b) not in cache:
            va, vb = values.get(a, {}).get(metric), values.get(b, {}).get(metric)
            keys = sorted(va.keys() & vb.keys()) if va is not None and vb is not None else []
            cache[(metric, a, b)] = paired_bootstrap(np.array([vb[k] for k in keys]), np.array([va[k] for k in keys])
                                                     ) if len(keys) >= 2 else None
        return cache[(metric, a, b)]

    return paired


def write_outputs(out: Path, results: dict[str, dict[str, list[float]]], rows: dict[str, list[dict]],
                  notes: list[str], meta: dict, columns: Optional[dict] = None, shared_noise: tuple[str, ...] = (),
                  reference: Optional[str] = None, breakdown: tuple[str, ...] = ()) -> Table:
    """Per-image scores, per-run summaries and the table. Rows in ``shared_noise`` (the base and its LoRAs) are
    compared pairwise; each of them gets its paired difference against ``reference`` (the base)."""
    paired = paired_comparisons({label: per_prompt_values(rows[label], breakdown) for label in shared_noise})
    shown = {label: {m: v for m, v in r.items() if not m.startswith("clip_diversity_")} for label, r in results.items()}
    differences = {}
    if reference in shared_noise:
        for label in (lb for lb in shared_noise if lb != reference):
            diffs = {m: paired(m, label, reference) for m in shown[label] if not m.startswith("w2_divergence")}
            differences[label] = {m: d for m, d in diffs.items() if d is not None}
    for label, label_rows in rows.items():
        lines = [json.dumps({k: v for k, v in r.items() if k != "_embedding"}) for r in label_rows]
        atomic_write_bytes(out / "scores" / f"{label}.jsonl", ("\n".join(lines) + "\n").encode())
        summary = {m: {"per_seed": v, "mean": mean_and_se(v)[0], "se": mean_and_se(v)[1]} for m, v in results[label].items()}
        record = {"label": label, "meta": meta, "metrics": summary}
        if label in differences:
            record[f"paired_vs_{reference}"] = differences[label]
        atomic_write_json(out / "runs" / f"{label}.json", record)
    table = Table(shown, notes=notes + [f"ClipDiversity = {DIVERSITY_DEFAULT} variant (100 * (1 - cos)); the l2 "
                                        "variant is in runs/*.json.",
                                        f"{meta['num_prompts']} prompts x {meta['images_per_prompt']} images x "
                                        f"{len(meta['seeds'])} seeds, {meta['steps']} steps, CFG {meta['guidance_scale']}, "
                                        f"{meta['resolution']} px."], columns=columns or {}, paired=paired,
                  differences=differences, reference=reference)
    atomic_write_bytes(out / "table.md", table.to_markdown().encode())
    atomic_write_bytes(out / "table.csv", table.to_csv().encode())
    atomic_write_bytes(out / "table.tex", table.to_latex().encode())
    return table


def _build_metrics(args, device, notes: list[str]) -> dict:
    """The metrics whose weights were given; a note for each left out (never a zero in the table)."""
    from sd3_adrpo.metrics import build_metric

    specs = {
        "aesthetic": (args.aesthetic, {"clip": args.clip or "openai/clip-vit-large-patch14"}, "--aesthetic"),
        "blip_score": (args.blip, {"tokenizer": args.bert_tokenizer}, "--blip"),
        "image_reward": (args.image_reward, {"tokenizer": args.bert_tokenizer}, "--image_reward"),
        "pickscore": (args.pickscore, {"processor": args.pickscore_processor}, "--pickscore"),
        "hpsv2": (args.hpsv2, {}, "--hpsv2"),
    }
    metrics = {}
    for name, (weights, kwargs, flag) in specs.items():
        if weights:
            metrics[name] = build_metric(name, weights, device=device, **kwargs)
        else:
            notes.append(f"{name} left out: no {flag} weights given.")
    return metrics


def judge_columns(metrics: dict, prompts: list[str], metadata: Optional[dict] = None) -> tuple[tuple[str, ...], dict]:
    """The metrics to break down by category (those that sort ``prompts`` into categories) and the table columns
    (label, higher is better) that metrics and breakdowns report, in that order (a metric without a label of its
    own keeps the paper's column name, or its key)."""
    breakdown, columns = [], {}
    for key, metric in metrics.items():
        label = metric.label or key
        if metric.label:
            columns[key] = (label, metric.higher_is_better)
        from sd3_adrpo.evaluation import prompt_categories_of

        fields = [metadata.get(p, {}) for p in prompts] if metadata else None
        categories = prompt_categories_of(metric, list(prompts), fields)
        if categories is not None:
            breakdown.append(key)
            columns.update({f"{key}_{c}": (f"{label} {c}", metric.higher_is_better) for c in sorted(set(categories))})
    return tuple(breakdown), columns


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a training config (YAML): its pretrained_model, final_eval_prompts (else "
                                     "eval_prompts), sampler settings, drop_t5, T5 length, evaluation CLIP and judges "
                                     "become the defaults of --base, --prompts, --steps, ..., --clip, --judge (flags "
                                     "still win); default: the config.yaml the first --run was trained with")
    ap.add_argument("--base", help="SD3/SD3.5, FLUX.1 or SANA pipeline (hub id or folder): the 'Base' row and the "
                                   "LoRAs' base, sampled by the trainer's sampler")
    ap.add_argument("--base_label", default="Base")
    ap.add_argument("--skip_base", action="store_true", help="no row for the base pipeline itself")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=RUN",
                    help="a trained LoRA as a row: a run's output_dir (its final/ is used; its eval_metrics.jsonl, "
                         "if any, goes into fig3.png/pdf) or a LoRA folder; repeat for several")
    ap.add_argument("--pipeline", action="append", default=[], metavar="LABEL=PIPELINE",
                    help="another diffusers text-to-image pipeline (folder or hub id) as an extra row")
    ap.add_argument("--prompts", help="prompt file (.txt, .csv, .jsonl)")
    ap.add_argument("--num_prompts", type=int, default=0,
                    help="use N prompts drawn at random with --prompt_seed, in file order (0: all)")
    ap.add_argument("--prompt_seed", type=int, default=0, help="seed of the --num_prompts draw")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance_scale", type=float, default=7.0)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--drop_t5", action="store_true")
    ap.add_argument("--max_sequence_length", type=int, default=256)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--clip", help="CLIP for ClipScore / ClipDiversity (hub id or folder), e.g. "
                                   "openai/clip-vit-large-patch14; left out of the table if not given")
    ap.add_argument("--aesthetic", metavar="HEAD_PTH", help="LAION aesthetic v2 head (sac+logos+ava1-l14-linearMSE.pth); "
                                                        "uses --clip as its CLIP ViT-L/14")
    ap.add_argument("--pickscore", help="PickScore weights, e.g. yuvalkirstain/PickScore_v1")
    ap.add_argument("--pickscore_processor", help="PickScore's processor (default: laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                                                  "unless the weights folder has one)")
    ap.add_argument("--image_reward", help="ImageReward: THUDM/ImageReward, a folder or ImageReward.pt")
    ap.add_argument("--blip", metavar="MODEL_LARGE_PTH", help="BLIP pre-train weights (model_large.pth) for BLIPScore")
    ap.add_argument("--bert_tokenizer", default="bert-base-uncased", help="BERT tokenizer for ImageReward / BLIPScore")
    ap.add_argument("--hpsv2", metavar="CHECKPOINT", help="HPS v2 / v2.1 checkpoint (open_clip ViT-H-14)")
    ap.add_argument("--judge", action="append", default=[], metavar="SPEC",
                    help="a judge as a column: a metric name or package.module:Class, optionally @WEIGHTS, e.g. "
                         "tinyworld.scorers:Oracle (the tiny world's oracle, with a column per prompt category); "
                         "repeat for several; with --config, the config's judges")
    ap.add_argument("--out", required=True, help="output folder (images/, scores/, runs/, table.*)")
    return ap


def _config_defaults(path: str) -> dict:
    """Defaults for this CLI from a training config, so a run is evaluated with the settings it was trained with."""
    from sd3_adrpo.config import parse_args

    cfg = parse_args(["--config", path])
    return {"base": cfg.pretrained_model, "prompts": cfg.final_eval_prompts or cfg.eval_prompts,
            "steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale, "resolution": cfg.resolution,
            "drop_t5": cfg.drop_t5, "max_sequence_length": cfg.t5_length, "clip": cfg.eval_clip_model,
            "judge": list(cfg.judges)}


def _run_config(runs: list[str]) -> Optional[str]:
    """Without --config: the training config a --run was trained with (its config.yaml, in the run folder or beside
    its LoRA), the first one found."""
    for _, path in map(_spec, runs):
        lora, run = _lora_dir(path)
        for candidate in (lora / "config.yaml", run / "config.yaml"):
            if candidate.is_file():
                return str(candidate)
    return None


def _lora_dir(path: str) -> tuple[Path, Path]:
    """(LoRA folder, the run folder that may hold its eval_metrics.jsonl) for a --run path: a run's output_dir,
    or its final/ (or any LoRA folder)."""
    p = Path(path)
    if (p / "final" / "pytorch_lora_weights.safetensors").is_file():
        return p / "final", p
    return p, p.parent


def main(argv: Optional[list[str]] = None) -> Table:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = args.config or _run_config(args.run)
    if config:  # a run is evaluated with the sampler, prompts and CLIP it was trained with, unless flags say otherwise
        if not args.config:
            print(f"settings (sampler, base, prompts, CLIP, judges) from {config}; flags override them")
        parser.set_defaults(**_config_defaults(config))
        args = parser.parse_args(argv)
        args.judge = list(dict.fromkeys(args.judge))  # --judge appends to the config's judges: each once
    for name in ("base", "prompts"):
        if getattr(args, name) is None:
            raise SystemExit(f"error: --{name} is required (or give --config with a training config)")
    if args.images_per_prompt < 2:
        raise SystemExit("error: --images_per_prompt must be >= 2 (ClipDiversity compares images of a prompt)")
    try:
        records = load_prompt_records(args.prompts)
        metadata = prompt_metadata(records, args.prompts)  # a row's other fields, for GenEval-style judges
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    prompts = seeded_subset([r["prompt"] for r in records], args.num_prompts, args.prompt_seed)
    runs = [(label, *_lora_dir(path)) for label, path in map(_spec, args.run)]
    for label, lora, _ in runs:
        if not (lora / "pytorch_lora_weights.safetensors").is_file():
            raise SystemExit(f"error: run {label}: {lora} has no pytorch_lora_weights.safetensors (pass a run's "
                             "output_dir or its final/)")
    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(prompts=tuple(prompts), seeds=tuple(args.seeds), images_per_prompt=args.images_per_prompt,
                  steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution)
    base_pipe = load_pipeline(args.base, drop_t5=args.drop_t5, dtype=DTYPES[args.dtype])
    try:  # before anything is generated
        family_for_pipeline(base_pipe).check_resolution(base_pipe, args.resolution)
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None
    rows_spec = [] if args.skip_base else [(args.base_label, Settings(args.base, None, **common), base_pipe)]
    rows_spec += [(label, Settings(args.base, str(lora), **common), base_pipe) for label, lora, _ in runs]
    rows_spec += [(label, Settings(src, None, **common), None) for label, src in map(_spec, args.pipeline)]
    manifests = {}
    for label, settings, pipe in rows_spec:
        manifests[label] = generate(out, label, settings, pipe=pipe, drop_t5=args.drop_t5,
                                    dtype=DTYPES[args.dtype], device=device,
                                    max_sequence_length=args.max_sequence_length)
    notes = []
    clip = None
    if args.clip:
        from sd3_adrpo.metrics import ClipScore

        clip = ClipScore(args.clip, device=device)
    else:
        notes.append("ClipScore and ClipDiversity left out: no --clip weights given.")
    metrics = {**_build_metrics(args, device, notes), **build_judges(args.judge, device)}
    breakdown, columns = judge_columns(metrics, prompts, metadata)
    results, rows = {}, {}
    for label, manifest in manifests.items():
        rows[label] = score(out, manifest, clip=clip, metrics=metrics, metadata=metadata)
        results[label] = aggregate(rows[label], breakdown)
    meta = {"num_prompts": len(prompts), **{k: v for k, v in common.items() if k != "prompts"},
            "base": args.base, "prompts_file": args.prompts}
    shared = tuple(label for label, _, pipe in rows_spec if pipe is not None)  # the base pipeline's rows: one noise
    table = write_outputs(out, results, rows, notes, meta, columns, shared_noise=shared,
                          reference=None if args.skip_base else args.base_label, breakdown=breakdown)
    print(table.to_markdown())
    trajectories = {label: run for label, _, run in runs if (run / "eval_metrics.jsonl").is_file()}
    if trajectories:
        from sd3_adrpo.plots import load_trajectory, plot_tradeoff

        for path in plot_tradeoff({k: load_trajectory(v) for k, v in trajectories.items()}, out / "fig3"):
            print(f"wrote {path} (Figure 3: the runs' held-out trajectories)")
    return table
